"""Step 4, healing the pruned model: LoRA adapters (`lora`) on a 4-bit base, trained with the HF Trainer,
optionally by distillation (`train.heal`), then merged into the weights shard by shard (`merge`); and every
healing method behind one entry point (`methods.heal_cut`: none, qlora, distill, `linear_patch`,
`replacement` layer, `last_layers`), each ending in a plain checkpoint."""

from ..core.lazy import lazy as _lazy

__getattr__, __dir__ = _lazy(__name__, ["lora", "merge", "train", "methods", "linear_patch", "replacement", "last_layers"])
