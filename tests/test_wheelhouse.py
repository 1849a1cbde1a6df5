"""`make wheelhouse` chooses, for an offline node, the wheels each part of the GPU check needs beyond what
the node has: checked here on a resolution written by hand (pip's resolution needs the package index)."""

import pytest

from bench import wheelhouse

# what pip resolves for the roots (versions and requirements as their wheels declare them, shortened)
RESOLVED = {
    "torch": {"version": "2.13.0", "requires": ["triton==3.7.0; platform_system == 'Linux'", "sympy>=1.13"]},
    "triton": {"version": "3.7.0", "requires": []},
    "sympy": {"version": "1.14.0", "requires": []},
    "transformers": {"version": "5.24.0", "requires": ["huggingface-hub<3.0,>=1.31.0", "tokenizers<0.24.0,>=0.23.1",
                                                       "regex>=2025.10.22", "pytest; extra == 'testing'"]},  # fmt: skip
    "huggingface-hub": {"version": "2.4.0", "requires": ["httpx2>=2", "hf-xet>=1.8; platform_machine == 'x86_64'"]},
    "httpx2": {"version": "2.16.2", "requires": []},
    "hf-xet": {"version": "1.8.0", "requires": []},
    "tokenizers": {"version": "0.23.3", "requires": ["huggingface-hub>=0.16"]},
    "regex": {"version": "2026.11.19", "requires": []},
    "peft": {"version": "0.21.2", "requires": ["transformers", "torch>=1.13.0", "huggingface_hub>=0.25.0"]},
    "bitsandbytes": {"version": "0.50.2", "requires": ["torch<3,>=2.3", "numpy>=1.17"]},
    "numpy": {"version": "2.4.6", "requires": []},
}
ROOTS = ["torch", "transformers", "peft"]
STAYS = {"torch", "triton", "sympy"}  # torch's closure: the node's own CUDA build
STOCK = {"torch": "2.11.0+cu130", "triton": "3.6.0", "transformers": "5.17.0", "huggingface-hub": "1.33.0",
         "tokenizers": "0.23.2", "regex": "2025.9.1", "peft": "0.17.1", "numpy": "2.5.2"}  # fmt: skip


def test_the_node_packages_are_read_from_pip_list_freeze():
    freeze = "torch==2.11.0+cu130\nPyYAML==6.0.2\nhuggingface_hub == 1.33.0\n-e git+https://x/y#egg=z\nfoo @ file:///tmp/foo\n# note\n"
    assert wheelhouse.node_packages(freeze) == {"torch": "2.11.0+cu130", "pyyaml": "6.0.2", "huggingface-hub": "1.33.0"}


def test_only_what_the_node_lacks_or_has_too_old_is_carried():
    # the kit needs transformers >= 5.24, which needs a newer regex; the node's hub 1.33, tokenizers 0.23.2 and
    # peft 0.17.1 are accepted, so hub's own needs (httpx2, hf-xet) are not carried; torch's closure stays
    assert wheelhouse.missing(ROOTS, RESOLVED, STOCK, "3.12", STAYS) == {"regex": "2026.11.19", "transformers": "5.24.0"}
    # a hub too old for transformers 5.24: carried, and with it what it needs that the node lacks
    older = {**STOCK, "huggingface-hub": "1.20.0", "hf-xet": "1.9.0"}
    assert wheelhouse.missing(ROOTS, RESOLVED, older, "3.12", STAYS) == {
        "httpx2": "2.16.2", "huggingface-hub": "2.4.0", "regex": "2026.11.19", "transformers": "5.24.0"}  # fmt: skip
    # a node with torch alone: everything reachable but torch's closure
    bare = {"torch": "2.11.0", "triton": "3.6.0", "sympy": "1.14.0"}
    assert set(wheelhouse.missing(ROOTS, RESOLVED, bare, "3.12", STAYS)) == {
        "transformers", "huggingface-hub", "httpx2", "hf-xet", "tokenizers", "regex", "peft"}  # fmt: skip
    # markers are the node's: on Python 3.12 on Linux x86_64, hf-xet is needed; an extra's requirement never is
    assert "pytest" not in wheelhouse.missing(ROOTS, RESOLVED, bare, "3.12", STAYS)


@pytest.fixture
def fake_index(monkeypatch):
    """resolve() over RESOLVED (each part's closure), and wheels of SIZES bytes instead of downloads."""
    closure = {"full": {"torch", "triton", "sympy", "transformers", "huggingface-hub", "httpx2", "hf-xet", "tokenizers",
                        "regex", "peft", "numpy"}}  # fmt: skip
    closure["4bit"] = closure["full"] | {"bitsandbytes"}
    parts = {"full": ("torch", "transformers", "peft", "numpy"), "4bit": ("bitsandbytes",)}
    monkeypatch.setattr(wheelhouse, "PARTS", parts)
    monkeypatch.setattr(wheelhouse, "resolve", lambda needs, python: {
        name: RESOLVED[name] for name in closure["4bit" if "bitsandbytes" in needs else "full"]})  # fmt: skip
    monkeypatch.setattr(wheelhouse, "LIMIT", 60)

    def fetch(pins, python, folder):
        folder.mkdir(parents=True, exist_ok=True)
        for name, version in pins.items():
            (folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl").write_bytes(b"w" * (41 if name == "bitsandbytes" else 5))
        return wheelhouse.size(folder)

    return fetch


def test_each_set_holds_everything_its_part_needs_where_it_fits(fake_index, tmp_path):
    install = wheelhouse.build(STOCK, STAYS, "3.12", tmp_path, fetch=fake_index)
    assert install == {"full": ["full"], "4bit": ["4bit"]}  # sets of 10 and 51 bytes, the limit 60: each on its own
    names = lambda part: sorted(w.name.split("-")[0] for w in (tmp_path / part).glob("*.whl"))  # noqa: E731
    assert names("full") == ["regex", "transformers"] and names("4bit") == ["bitsandbytes", "regex", "transformers"]


def test_a_set_over_the_limit_holds_only_what_the_sets_before_it_do_not(fake_index, tmp_path, capsys):
    bare = {"torch": "2.11.0", "triton": "3.6.0", "sympy": "1.14.0"}
    install = wheelhouse.build(bare, STAYS, "3.12", tmp_path, fetch=fake_index)
    assert install == {"full": ["full"], "4bit": ["full", "4bit"]}  # 8 x 5 + 41 bytes: over 60 together
    assert [w.name.split("-")[0] for w in (tmp_path / "4bit").glob("*.whl")] == ["bitsandbytes"]
    assert len(list((tmp_path / "full").glob("*.whl"))) == 8
    assert "it holds only what full does not" in capsys.readouterr().out
