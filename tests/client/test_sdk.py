"""The SDK against a live registry: from a folder of tensors to the same tensors, through
submit, scan, a second person's approval, the registry's signature and an alias."""

from __future__ import annotations

import numpy as np
import pytest
from smr import Registry, SmrError

from tests.client.conftest import scan, sign

REVIEWS = "/namespaces/acme/models/tiny/versions/1/reviews"


@pytest.fixture
def client_dirs(tmp_path, monkeypatch):
    """The SDK's cache and pinned keys under tmp_path, not the real home."""
    for name in ("config", "cache", "state"):
        monkeypatch.setenv(f"XDG_{name.upper()}_HOME", str(tmp_path / "xdg" / name))
    for name in ("SMR_URL", "SMR_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "xdg"


def test_push_submit_approve_by_a_second_token_pull_by_alias_and_load_tensors(
    registry_server, tokens, tmp_path, client_dirs
):
    from safetensors.numpy import save_file

    url = registry_server.url
    arrays = {
        "embed.weight": np.arange(24, dtype=np.float32).reshape(6, 4),
        "head.bias": np.array([-1, 0, 7], dtype=np.int64),
    }
    folder = tmp_path / "model"
    (folder / "extra").mkdir(parents=True)
    save_file(arrays, str(folder / "model.safetensors"))
    (folder / "config.json").write_text('{"hidden": 4}')
    (folder / "extra" / "README.md").write_text("A tiny model.\n")

    with Registry(url, tokens["alice"]) as alice:
        pushed = alice.push("acme/tiny", folder, submit=True, tags={"task": "demo"})
    assert (pushed.version, pushed.submitted) == (1, True)
    assert sorted(f["path"] for f in pushed.files) == [
        "config.json",
        "extra/README.md",
        "model.safetensors",
    ]
    assert pushed.bytes_sent == sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())

    # The worker's scan, in-process; the approval by bob, through his own token.
    assert scan("acme", "tiny", 1) == "pending_review"
    with Registry(url, tokens["bob"]) as bob:
        # alice, who pushed it, may not approve it: the second token matters.
        with Registry(url, tokens["alice"]) as alice, pytest.raises(SmrError) as refused:
            alice.api.json("POST", REVIEWS, json={"decision": "approve"})
        assert refused.value.status == 403
        body = bob.api.json("POST", REVIEWS, json={"decision": "approve", "comment": "ok"})
    assert body["version"]["state"] == "approved"
    sign("acme", "tiny", 1)
    with Registry(url, tokens["root"]) as root:
        root.api.json("PUT", "/namespaces/acme/models/tiny/aliases/production", json={"version": 1})

    # carol (a viewer) goes from the alias to the tensors in two lines.
    with Registry(url, tokens["carol"]) as carol:
        path = carol.pull("acme/tiny@production")
        tensors = Registry.load_tensors(path)
        result = carol.pull_result("acme/tiny@production", tmp_path / "copy")
        versions = list(carol.versions("acme/tiny"))
        version = carol.version("acme/tiny@production")

    assert sorted(tensors) == sorted(arrays)
    for name, array in arrays.items():
        assert tensors[name].dtype == array.dtype
        np.testing.assert_array_equal(tensors[name], array)
    assert path.is_relative_to(client_dirs / "cache" / "smr")
    assert (path / "extra" / "README.md").read_text() == "A tiny model.\n"
    assert (result.version, result.path) == (1, tmp_path / "copy")
    assert result.signature is not None and result.signature["verified"] is True
    assert result.bytes_received == 0  # every blob came from the cache of the first pull
    assert (tmp_path / "copy" / "model.safetensors").read_bytes() == (
        folder / "model.safetensors"
    ).read_bytes()
    assert [(v.number, v.state) for v in versions] == [(1, "approved")]
    assert (version.number, version.raw["tags"]) == (1, {"task": "demo"})

    # One exception family, carrying the server's codes: mallory sees nothing of acme.
    with Registry(url, tokens["mallory"]) as mallory, pytest.raises(SmrError) as denied:
        mallory.pull("acme/tiny@production")
    assert (denied.value.code, denied.value.status, denied.value.exit_code) == ("not_found", 404, 4)
