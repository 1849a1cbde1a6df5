"""The budget step (notebook 06): a contiguous block, sets of whole layers and attention or MLP sublayers removed
at the same parameter budgets, each chosen by its criteria, judged on held-out loss, recall and cost."""

from ..choose.criteria import choose_units
from ..choose.greedy import greedy_removal
from ..core import layers
from ..core.block import Layers, Sublayers
from ..core.config import BudgetConfig
from ..core.device import provenance
from ..core.ledger import plan
from ..evaluate import metrics
from ..evaluate.inference_cost import parameters
from ..evaluate.recall_task import recall_items
from ..experiments import budget as budgets
from ..experiments import curves
from ..loaders import data
from ..loaders.models import load_model
from ..run import Run
from ..scan.similarity import angular_distances
from .oracle import model_name

CRITERIA = {"block": ["similarity"], "layers": ["shortgpt", "greedy_layers"], "attention": ["llm_drop_attention", "greedy_attention"],
            "mlp": ["llm_drop_mlp", "greedy_mlp"]}  # each granularity's criteria (kit.choose.criteria.CRITERIA)  # fmt: skip


def budget(run: Run, config: BudgetConfig):
    """A sublayer scan and (config.greedy) the greedy removal orders on calibration texts, then every criterion of
    every unit at every budget, evaluated: writes sublayer_distances.safetensors, greedy_{unit}.safetensors,
    budget.csv (one row per choice, budget and metric) and budget_best.csv (the best choice per budget by held-out
    loss, paired against the paper's block)."""
    name = model_name(run, config.model_name)
    model, tokenizer = load_model(name, **run.load_kwargs(config.quantize))
    L, settings = layers.num_layers(model), dict(max_length=config.max_length, batch_size=config.batch_size)
    calibration = data.load_texts(config.source, "train", config.n_calibration)
    held_out = data.load_texts(config.source, "validation", config.n_held_out)
    plan(model, scan=dict(settings, sublayers=True), greedy=settings)
    scan = angular_distances(model, tokenizer, calibration, sublayers=True, model_name=name, **settings)
    scan.save(run.file("sublayer_distances"))
    singles = {"layers": [Layers([i]) for i in range(L)], **{kind: [Sublayers(kind, [i]) for i in range(L)] for kind in ("attention", "mlp")}}
    steps = {unit: budgets.most_units(model, singles[unit], max(config.budgets)) for unit in singles if unit in config.units}
    greedy = {unit: greedy_removal(model, tokenizer, calibration, unit=unit, steps=k, **settings)
              for unit, k in steps.items() if config.greedy and k > 0}  # fmt: skip
    for unit, order in greedy.items():
        order.save(run.file("greedy", unit=unit))

    def pick(criterion, unit):
        return lambda n: choose_units(criterion, L, n, distances=scan if unit in ("attention", "mlp") else scan.layers(), greedy=greedy.get(unit))

    choices = [budgets.Choice(unit, criterion, pick(criterion, unit)) for unit in config.units for criterion in CRITERIA[unit]
               if config.greedy or not criterion.startswith("greedy")]  # fmt: skip
    questions = data.mmlu_questions(data.mmlu_subjects()[: config.mmlu_subjects], per_subject=config.mmlu_per_subject)
    mmlu = metrics.MMLUAccuracy(questions, shots=config.shots, batch_size=config.batch_size)
    with_mmlu = metrics.above_chance(metrics.evaluate_all(model, tokenizer, [mmlu])["mmlu"], force=config.mmlu)
    evals = [metrics.ValidationLoss(held_out, **settings),
             metrics.RecallAccuracy(recall_items(n=config.recall_items, facts=config.recall_facts, seed=config.seed), batch_size=config.batch_size),
             *([mmlu] if with_mmlu else []),
             metrics.InferenceCost(prompt_tokens=config.cost_prompt_tokens, new_tokens=config.cost_new_tokens, repeats=config.cost_repeats)]  # fmt: skip
    table = budgets.budget_sweep(model, tokenizer, choices=choices, budgets=config.budgets, evals=evals)
    run.write_csv("budget", table, index=False)
    run.write_csv("budget_best", curves.best_by_budget(table, "val_loss"), index=False)
    run.record("budget", config, steps=steps, mmlu=with_mmlu, model=name, layers=L, parameters=parameters(model), placement=provenance(model))
    return table
