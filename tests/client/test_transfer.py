"""`smr push` and `smr pull` against a live registry, run as the real command in a subprocess.

Whole models go up and come back identical, checked against their digests and the registry's
signature; an interrupted push or pull (SIGINT, SIGKILL) resumes instead of starting over; a
byte changed on the way, or a signature by a key the user does not trust, fails with exit 3
and leaves nothing in DEST. Bytes on the wire are counted by a loopback proxy between the
client and the server; the server's audit log says what it stored and served.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.client.conftest import api, approve, make_env, popen_smr, run_smr, scan

MODEL = "/namespaces/acme/models/bert"
GIB = 1 << 30
MIB = 1 << 20
# A 2 MiB file made of this marker only: the tampering proxy flips a byte of the first whole
# marker it sees in a response, which can only be this file's body.
MARKER = b"<smr-test-marker:0123456789abcd>"


# --- Test data ------------------------------------------------------------------------------


def write_safetensors(path: Path, data_bytes: int, *, seed: int = 0) -> None:
    """A valid safetensors file (one U8 tensor) of `data_bytes` data, written in 8 MiB
    blocks: never held whole in memory. `seed` makes different contents of one size."""
    header = json.dumps(
        {"w": {"dtype": "U8", "shape": [data_bytes], "data_offsets": [0, data_bytes]}}
    ).encode()
    header += b" " * (-len(header) % 8)
    block = hashlib.sha256(f"seed{seed}".encode()).digest() * (8 * MIB // 32)
    block = bytes(b ^ (i % 251) for i, b in enumerate(block[:4096])) + block[4096:]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(header)) + header)
        left = data_bytes
        while left:
            n = min(left, len(block))
            handle.write(block[:n])
            left -= n


def model_folder(root: Path, big_bytes: int, *, config: str = '{"hidden_size": 8}\n') -> Path:
    """Five files: one big safetensors, a small one, config, tokenizer, README."""
    write_safetensors(root / "weights" / "model.safetensors", big_bytes)
    write_safetensors(root / "weights" / "head.safetensors", 3 * MIB, seed=1)
    (root / "config.json").write_text(config)
    (root / "tokenizer.json").write_text(json.dumps({"vocab": [f"t{i}" for i in range(500)]}))
    (root / "README.md").write_text("# bert\n\nA test model.\n")
    return root


def tree(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `root` (links followed)."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            digest = hashlib.sha256()
            with path.open("rb") as handle:
                while chunk := handle.read(8 * MIB):
                    digest.update(chunk)
            out[path.relative_to(root).as_posix()] = digest.hexdigest()
    return out


def data_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


# --- A loopback proxy that counts (and can tamper with) the bytes ------------------------------


class Proxy:
    """Forwards 127.0.0.1:<port> to the registry, counting bytes each way; armed with
    `flip_marker`, it flips one byte of the first whole MARKER in a server response."""

    def __init__(self, upstream_url: str) -> None:
        host, port = upstream_url.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.up = 0
        self.down = 0
        self.flip_marker = False
        self.flipped = 0
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def reset(self) -> None:
        with self.lock:
            self.up = self.down = 0

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.listener.close()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            threading.Thread(target=self._pump, args=(client, server, "up"), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, "down"), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        try:
            while chunk := src.recv(256 * 1024):
                if direction == "down" and self.flip_marker and MARKER in chunk:
                    with self.lock:
                        if self.flip_marker:
                            at = chunk.index(MARKER) + 5
                            chunk = chunk[:at] + bytes([chunk[at] ^ 0x01]) + chunk[at + 1 :]
                            self.flip_marker = False
                            self.flipped += 1
                with self.lock:
                    if direction == "up":
                        self.up += len(chunk)
                    else:
                        self.down += len(chunk)
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()


@pytest.fixture
def proxy(registry_server) -> Iterator[Proxy]:
    p = Proxy(registry_server.url)
    yield p
    p.close()


# --- Helpers ----------------------------------------------------------------------------------


def ok(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    body: dict[str, Any] = json.loads(result.stdout)
    return body


def failed(result: subprocess.CompletedProcess[str], code: int) -> dict[str, Any]:
    assert result.returncode == code, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    error: dict[str, Any] = json.loads(result.stderr.strip().splitlines()[-1])["error"]
    return error


def wait_until(condition: Callable[[], bool], what: str, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 120
    while not condition():
        if proc.poll() is not None:
            _, err = proc.communicate()
            raise AssertionError(f"smr exited ({proc.returncode}) before {what}:\n{err}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def stop(proc: subprocess.Popen[str], sig: int) -> int:
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    return proc.returncode


def push_parts(env: dict[str, str], rel: str) -> tuple[int, int]:
    """(parts stored, part size) of `rel` as the interrupted push's state file records them."""
    for state in (Path(env["XDG_STATE_HOME"]) / "smr" / "pushes").glob("*.json"):
        with contextlib.suppress(ValueError, OSError):
            entry = json.loads(state.read_text())["files"].get(rel, {})
            return len(entry.get("parts", [])), int(entry.get("part_size", 0))
    return 0, 0


def pulled_bytes(env: dict[str, str]) -> int:
    """Bytes a pull under way has recorded in its partial blobs' progress files."""
    total = 0
    for side in (Path(env["XDG_CACHE_HOME"]) / "smr" / "blobs" / "sha256").glob("*.partial.json"):
        with contextlib.suppress(ValueError, OSError):
            total += sum(json.loads(side.read_text())["ranges"].values())
    return total


def audit_sum(action: str, key: str, **filters: Any) -> int:
    from registry.models import AuditEvent

    events = AuditEvent.objects.filter(action=action, **filters)
    return sum(int(e.details.get(key) or 0) for e in events)


def served_bytes(target_prefix: str) -> int:
    """Bytes the server actually sent for downloads under `target_prefix`: each download's
    range, or what its `download_incomplete` follow-up says was sent before it broke."""
    from registry.models import AuditEvent

    cut = {
        e.details["download_seq"]: e.details["bytes_sent"]
        for e in AuditEvent.objects.filter(
            action="artifact.download_incomplete", target__startswith=target_prefix
        )
    }
    return sum(
        cut.get(e.seq, e.details["bytes"])
        for e in AuditEvent.objects.filter(
            action="artifact.download", target__startswith=target_prefix
        )
    )


# --- The acceptance round trip (1 GiB) ----------------------------------------------------------


@pytest.mark.slow
def test_push_and_pull_a_model_interrupted_and_resumed(
    registry_server, tokens, smr_env, proxy, tmp_path
):
    src = model_folder(tmp_path / "src", GIB)
    size = data_bytes(src)
    big = "weights/model.safetensors"
    alice = make_env(proxy.url, tokens["alice"], tmp_path / "alice")
    push = ["--json", "push", "acme/bert", str(src)]

    # Interrupted twice: Ctrl-C once two parts of the big file are stored (the parts in
    # flight are finished), then a kill (the parts in flight are lost).
    run = popen_smr(push, alice)
    wait_until(lambda: push_parts(alice, big)[0] >= 2, "two parts", run)
    assert stop(run, signal.SIGINT) == 130
    stored, part = push_parts(alice, big)
    run = popen_smr(push, alice)
    wait_until(lambda: push_parts(alice, big)[0] >= stored + 8, "eight more parts", run)
    assert stop(run, signal.SIGKILL) == -signal.SIGKILL
    stored, part = push_parts(alice, big)
    assert stored >= 10 and stored * part < GIB
    pushed = ok(run_smr(push, alice))

    # The third run finished the same version, sending only what was missing.
    assert pushed["version"] == 1 and pushed["ref"] == "acme/bert:1"
    assert pushed["bytes_sent"] <= size - stored * part
    assert proxy.up <= 1.1 * size, (proxy.up, size)
    assert audit_sum("upload.part", "size") <= 1.1 * GIB
    files = {f["path"]: f for f in pushed["files"]}
    assert {p: f["sha256"] for p, f in files.items()} == tree(src)
    versions = api(registry_server, tokens["alice"], "GET", f"{MODEL}/versions")
    assert [v["number"] for v in versions.json()["results"]] == [1]
    assert not list((Path(alice["XDG_STATE_HOME"]) / "smr" / "pushes").glob("*.json"))

    approve(registry_server, tokens, "acme", "bert", 1)

    # carol pulls on another machine: killed twice on the way, then completed.
    carol = make_env(proxy.url, tokens["carol"], tmp_path / "carol")
    dest = tmp_path / "dest"
    proxy.reset()
    pull = ["--json", "pull", "acme/bert:1", str(dest)]
    for sig, fraction in ((signal.SIGINT, 0.2), (signal.SIGKILL, 0.5)):
        run = popen_smr(pull, carol)
        wait_until(lambda f=fraction: pulled_bytes(carol) >= f * GIB, f"{fraction:.0%}", run)
        assert stop(run, sig) == (130 if sig == signal.SIGINT else -sig)
        assert not dest.exists() or not any(dest.iterdir())  # nothing before it verified
    before = pulled_bytes(carol)
    pulled = ok(run_smr(pull, carol))
    assert tree(dest) == tree(src)
    assert pulled["bytes_received"] <= size - before
    assert proxy.down <= 1.1 * size, (proxy.down, size)
    assert served_bytes("acme/bert/v1/") <= 1.1 * size
    # The key was pinned by the first (interrupted) run, on first use.
    assert pulled["signature"]["verified"] and pulled["signature"]["trust"] == "pinned"
    assert {f["path"] for f in pulled["files"]} == set(tree(src))

    # Version 2 shares four of the five files: the pull downloads only the changed one.
    (src / "config.json").write_text('{"hidden_size": 16}\n')
    ok(run_smr(["--json", "push", "acme/bert", str(src), "--submit"], alice))
    approve(registry_server, tokens, "acme", "bert", 2, submit_as=None)
    dest2 = tmp_path / "dest2"
    again = ok(run_smr(["--json", "pull", "acme/bert:2", str(dest2)], carol))
    changed = (src / "config.json").stat().st_size
    assert again["bytes_received"] == changed
    assert served_bytes("acme/bert/v2/") == changed
    assert tree(dest2) == tree(src)
    assert again["signature"]["trust"] == "pinned"


# --- Tampering and trust ------------------------------------------------------------------------


@pytest.fixture
def small_model(registry_server, tokens, smr_env, tmp_path) -> Path:
    """acme/bert:1, approved and signed: three files, one of them the 2 MiB marker file."""
    src = tmp_path / "small"
    (src / "weights").mkdir(parents=True)
    (src / "config.json").write_text('{"a": 1}\n')
    (src / "weights" / "marked.txt").write_bytes(MARKER * (2 * MIB // len(MARKER)))
    write_safetensors(src / "weights" / "w.safetensors", 5 * MIB)
    ok(run_smr(["--json", "push", "acme/bert", str(src), "--submit"], smr_env(tokens["alice"])))
    approve(registry_server, tokens, "acme", "bert", 1, submit_as=None)
    return src


def test_a_flipped_byte_fails_the_pull_and_leaves_nothing_in_dest(
    small_model, tokens, proxy, tmp_path
):
    carol = make_env(proxy.url, tokens["carol"], tmp_path / "carol")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "mine.txt").write_text("already here")
    proxy.flip_marker = True

    error = failed(run_smr(["--json", "pull", "acme/bert:1", str(dest)], carol), 3)

    assert proxy.flipped == 1
    assert error["code"] == "digest_mismatch" and error["extra"]["path"] == "weights/marked.txt"
    assert sorted(p.name for p in dest.rglob("*")) == ["mine.txt"]
    blobs = Path(carol["XDG_CACHE_HOME"]) / "smr" / "blobs" / "sha256"
    marked = hashlib.sha256((small_model / "weights" / "marked.txt").read_bytes()).hexdigest()
    assert not any(p.name.startswith(marked) for p in blobs.iterdir())
    # Control: the same pull without the tampering succeeds.
    ok(run_smr(["--json", "pull", "acme/bert:1", str(dest)], carol))
    assert tree(dest) == {**tree(small_model), "mine.txt": tree(dest)["mine.txt"]}


def other_key(tmp_path: Path) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    path = tmp_path / "other.pem"
    path.write_bytes(pem)
    return path


def test_a_signature_by_an_untrusted_key_fails_with_exit_3(
    small_model, registry_server, tokens, smr_env, tmp_path
):
    carol = smr_env(tokens["carol"], home=tmp_path / "carol")
    pull = ["--json", "pull", "acme/bert:1", str(tmp_path / "dest")]
    wrong = other_key(tmp_path)

    # --trusted-key of another key: refused before any download.
    error = failed(run_smr([*pull, "--trusted-key", str(wrong)], carol), 3)
    assert error["code"] == "untrusted_key" and "--trusted-key" in error["message"]
    assert not (tmp_path / "dest").exists()

    # Another key pinned for this registry (an impostor's bundle would look like this).
    known = Path(carol["XDG_CONFIG_HOME"]) / "smr" / "known_keys.json"
    known.parent.mkdir(parents=True, exist_ok=True)
    known.write_text(json.dumps({registry_server.url: [{"public_key_pem": wrong.read_text()}]}))
    error = failed(run_smr(pull, carol), 3)
    assert error["code"] == "untrusted_key" and "not pinned" in error["message"]
    assert not (tmp_path / "dest").exists()

    # The registry's real key, given explicitly, is accepted (control); then first use pins it.
    keys = api(registry_server, tokens["carol"], "GET", "/signing-keys").json()
    right = tmp_path / "registry.pem"
    right.write_text(keys[0]["public_key_pem"])
    assert ok(run_smr([*pull, "--trusted-key", str(right)], carol))["signature"]["trust"] == (
        "trusted_key"
    )
    known.unlink()
    assert ok(run_smr(pull, carol))["signature"]["trust"] == "first_use"
    assert [k["key_id"] for k in json.loads(known.read_text())[registry_server.url]] == [
        keys[0]["key_id"]
    ]

    # The registry's key changes (rotated, or an impostor): the pinned client refuses.
    from registry.signing.keys import signing_key_rotate

    signing_key_rotate(kind="local")
    alice = smr_env(tokens["alice"])
    ok(run_smr(["--json", "push", "acme/bert", str(small_model), "--submit"], alice))
    approve(registry_server, tokens, "acme", "bert", 2, submit_as=None)
    error = failed(run_smr(["--json", "pull", "acme/bert:2", str(tmp_path / "d2")], carol), 3)
    assert error["code"] == "untrusted_key"
    assert not (tmp_path / "d2").exists()


def test_an_approved_version_without_its_signature_is_refused(
    registry_server, tokens, smr_env, tmp_path
):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}\n")
    alice = smr_env(tokens["alice"])
    ok(run_smr(["--json", "push", "acme/bert", str(src), "--submit"], alice))
    assert scan("acme", "bert", 1) == "pending_review"
    base = "/namespaces/acme/models/bert/versions/1"
    response = api(
        registry_server, tokens["bob"], "POST", f"{base}/reviews", json={"decision": "approve"}
    )
    assert response.status_code in (200, 201), response.text
    # The sign job has not run: approved, but no registry signature to check.
    error = failed(run_smr(["--json", "pull", "acme/bert:1", str(tmp_path / "d")], alice), 3)
    assert error["code"] == "unsigned"
    assert not (tmp_path / "d").exists()


# --- Drafts, filters, the cache, sign-verify ---------------------------------------------------


def test_a_draft_pulls_with_digests_checked_and_no_signature(
    registry_server, tokens, smr_env, tmp_path
):
    src = model_folder(tmp_path / "src", 2 * MIB)
    alice = smr_env(tokens["alice"])
    pushed = ok(
        run_smr(
            ["--json", "push", "acme/bert", str(src), "--exclude", "*.md", "--tag", "stage=dev"],
            alice,
        )
    )
    assert sorted(f["path"] for f in pushed["files"]) == sorted(set(tree(src)) - {"README.md"})
    version = api(
        registry_server, tokens["alice"], "GET", "/namespaces/acme/models/bert/versions/1"
    )
    assert version.json()["state"] == "draft" and version.json()["tags"] == {"stage": "dev"}

    pulled = ok(run_smr(["--json", "pull", "acme/bert:1", "--include", "weights/*"], alice))
    assert pulled["signature"] is None
    snapshot = Path(pulled["path"])
    assert snapshot.is_relative_to(Path(alice["XDG_CACHE_HOME"]) / "smr" / "snapshots")
    assert tree(snapshot) == {k: v for k, v in tree(src).items() if k.startswith("weights/")}
    assert all(p.is_symlink() for p in snapshot.rglob("*") if p.is_file())


def test_the_cache_is_verified_and_pruned(small_model, tokens, smr_env, tmp_path):
    carol = smr_env(tokens["carol"], home=tmp_path / "carol")
    first = ok(run_smr(["--json", "pull", "acme/bert:1"], carol))
    listing = ok(run_smr(["--json", "cache", "ls"], carol))
    assert [s["ref"] for s in listing["snapshots"]] == ["acme/bert:1"]
    assert listing["blobs"]["count"] == 3

    # A blob changed on disk: verify reports and removes it; the next pull fetches it again.
    blob = Path(first["path"]) / "config.json"
    target = blob.resolve()
    target.chmod(0o644)
    target.write_text('{"a": 2}\n')
    report = run_smr(["--json", "cache", "verify"], carol)
    assert report.returncode == 3
    assert [b["sha256"] for b in json.loads(report.stdout)["bad"]] == [target.name]
    again = ok(run_smr(["--json", "pull", "acme/bert:1", str(tmp_path / "d")], carol))
    assert again["bytes_received"] == (small_model / "config.json").stat().st_size
    assert tree(tmp_path / "d") == tree(small_model)

    # DEST holds hard links to the blobs: an edit there changes the blob's stamp, so the next
    # pull hashes it again, finds it changed and downloads it again.
    edited = tmp_path / "d" / "weights" / "w.safetensors"
    assert edited.stat().st_ino == (Path(first["path"]) / "weights" / "w.safetensors").stat().st_ino
    data = bytearray(edited.read_bytes())
    data[100] ^= 1
    edited.write_bytes(bytes(data))
    third = ok(run_smr(["--json", "pull", "acme/bert:1"], carol))
    assert third["bytes_received"] == len(data)
    assert tree(Path(third["path"])) == tree(small_model)
    ok(run_smr(["--json", "pull", "acme/bert:1", str(tmp_path / "d")], carol))
    assert tree(tmp_path / "d") == tree(small_model)

    # Prune keeps what a snapshot links to, and drops the rest.
    assert ok(run_smr(["--json", "cache", "prune"], carol))["removed_blobs"] == []
    for link in Path(first["path"]).rglob("*.safetensors"):
        link.unlink()
    pruned = ok(run_smr(["--json", "cache", "prune"], carol))
    assert len(pruned["removed_blobs"]) == 1 and pruned["freed_bytes"] > 5 * MIB


def test_sign_verify_checks_a_local_folder(small_model, tokens, smr_env, tmp_path):
    carol = smr_env(tokens["carol"], home=tmp_path / "carol")
    dest = tmp_path / "dest"
    ok(run_smr(["--json", "pull", "acme/bert:1", str(dest)], carol))
    checked = ok(run_smr(["--json", "sign-verify", str(dest), "acme/bert:1"], carol))
    assert checked["files"] == 3 and checked["signature"]["verified"]

    path = dest / "weights" / "w.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    (dest / "extra.txt").write_text("not signed")
    error = failed(run_smr(["--json", "sign-verify", str(dest), "acme/bert:1"], carol), 3)
    assert error["code"] == "files_mismatch"
    assert error["extra"]["changed"] == ["weights/w.safetensors"]
    assert error["extra"]["extra"] == ["extra.txt"]


def test_a_push_into_a_draft_skips_what_the_server_has(registry_server, tokens, smr_env, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.json").write_text("{}\n")
    (src / "b.json").write_text('{"b": 1}\n')
    alice = smr_env(tokens["alice"])
    ok(run_smr(["--json", "push", "acme/bert", str(src)], alice))
    (src / "b.json").write_text('{"b": 2}\n')
    again = ok(run_smr(["--json", "push", "acme/bert:1", str(src), "--description", "d"], alice))
    assert again["version"] == 1
    assert again["bytes_sent"] == (src / "b.json").stat().st_size
    listed = api(registry_server, tokens["alice"], "GET", f"{MODEL}/versions/1")
    assert {f["path"]: f["sha256"] for f in listed.json()["files"]} == tree(src)
    assert listed.json()["description"] == "d"
    assert os.listdir(Path(alice["XDG_STATE_HOME"]) / "smr" / "pushes") == []
