"""The real `smr` in a subprocess against a live registry: --json on every command, exit codes,
login, job following, and the token kept out of output and the process list."""

from __future__ import annotations

import json
import os
import pty
import re
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.client.conftest import (
    api,
    approve,
    model_create,
    popen_smr,
    run_smr,
    scan,
    sign,
    smr_argv,
)

# What tqdm draws: a carriage return between redraws, and its bar and rate glyphs.
BAR_MARKS = re.compile(r"\r|\d+%\|| [0-9.]+[kMG]?i?B/s|it/s")


class Smr:
    """Runs `smr` and checks what every run must hold: no token of any actor in its output,
    no progress bar on stderr (a pipe is not a terminal), and the expected exit code."""

    def __init__(self, smr_env: Any, tokens: dict[str, str]) -> None:
        self.smr_env = smr_env
        self.tokens = tokens

    def env(self, user: str | None, **extra: str) -> dict[str, str]:
        env = self.smr_env(self.tokens[user] if user else None)
        env.update(extra)
        return env

    def check(self, result: subprocess.CompletedProcess[str], args: list[str]) -> None:
        output = result.stdout + result.stderr
        for name, token in self.tokens.items():
            assert token not in output, f"{name}'s token printed by smr {args}"
        assert not BAR_MARKS.search(result.stderr), f"a progress bar on a pipe: {result.stderr!r}"

    def run(
        self, user: str | None, *args: str, code: int = 0, input: str | None = None, **env: str
    ) -> subprocess.CompletedProcess[str]:
        result = run_smr(list(args), self.env(user, **env), input=input)
        self.check(result, list(args))
        assert result.returncode == code, (args, result.returncode, result.stdout, result.stderr)
        return result

    def json(self, user: str | None, *args: str, code: int = 0, **env: str) -> Any:
        result = self.run(user, *args, code=code, **env)
        return json.loads(result.stdout)


@pytest.fixture
def smr(smr_env, tokens) -> Smr:
    return Smr(smr_env, tokens)


FILES = {"config.json": b'{"a": 1}', "w/weights.bin": b"\x00" * 1000}


def draft(server, tokens, model: str = "bert", files: dict[str, bytes] | None = None) -> None:
    """acme/<model> version 1, a draft with `files`, uploaded by alice over HTTP."""
    model_create(server, tokens["alice"], "acme", model)
    base = f"/namespaces/acme/models/{model}"
    response = api(server, tokens["alice"], "POST", f"{base}/versions", json={})
    assert response.status_code == 201, response.text
    for path, data in (
        files or {"config.json": b'{"a": 1}', "w/weights.bin": b"\x00" * 1000}
    ).items():
        response = api(server, tokens["alice"], "PUT", f"{base}/versions/1/files/{path}", data=data)
        assert response.status_code == 201, response.text


def scan_job_id(ns: str, model: str, number: int) -> str:
    from registry.models import Job, JobKind

    job = Job.objects.get(
        kind=JobKind.SCAN,
        version__model__namespace__name=ns,
        version__model__name=model,
        version__number=number,
    )
    return str(job.pk)


# --- login -------------------------------------------------------------------------------------


def test_login_reads_the_token_from_stdin_and_stores_it_for_this_user_only(
    smr, registry_server, tokens
):
    env = smr.env(None)
    url = env.pop("SMR_URL")
    config = Path(env["XDG_CONFIG_HOME"]) / "smr"

    result = run_smr(["login", "--url", url], env, input=tokens["alice"] + "\n")
    smr.check(result, ["login"])
    assert result.returncode == 0, result.stderr
    assert result.stdout == "alice\n"
    assert "Logged in" in result.stderr
    credentials = config / "credentials.json"
    assert stat.S_IMODE(credentials.stat().st_mode) == 0o600
    assert stat.S_IMODE(config.stat().st_mode) == 0o700
    assert json.loads(credentials.read_text()) == {"url": url, "token": tokens["alice"]}

    # Later commands use the stored URL and token (none in the environment).
    result = run_smr(["--json", "ls"], env)
    smr.check(result, ["ls"])
    assert result.returncode == 0, result.stderr
    assert [n["name"] for n in json.loads(result.stdout)] == ["acme"]
    # SMR_TOKEN overrides the stored token: mallory sees her namespace only.
    result = run_smr(["ls", "--json"], {**env, "SMR_TOKEN": tokens["mallory"]})
    assert [n["name"] for n in json.loads(result.stdout)] == ["evil"]

    # --json on login too; a wrong token is refused (4) and the stored one stays.
    wrong = "smr_" + "x" * 40
    result = run_smr(["login", "--url", url, "--json"], env, input=wrong + "\n")
    smr.check(result, ["login"])
    assert result.returncode == 4, result.stderr
    assert wrong not in result.stdout + result.stderr
    assert json.loads(credentials.read_text())["token"] == tokens["alice"]
    result = run_smr(["--json", "login", "--url", url], env, input=tokens["bob"] + "\n")
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["username"] == "bob"
    assert body["credentials"] == str(credentials)
    assert {"namespace": "acme", "role": "reviewer"} in body["namespaces"]

    # The token is never an argument, and an empty stdin is a usage error.
    assert run_smr(["login", "--url", url, "--token", "t"], env).returncode == 2
    assert run_smr(["login", "--url", url], env, input="").returncode == 2
    assert run_smr(["login"], env, input=tokens["alice"]).returncode == 2  # no URL


# --- Every command with --json -----------------------------------------------------------------


def test_every_command_prints_json_that_parses(smr, registry_server, tokens, actors, tmp_path):
    draft(registry_server, tokens, files=FILES)

    # Reading the catalog; the global flag goes before or after the subcommand.
    assert [n["name"] for n in smr.json("alice", "--json", "ls")] == ["acme"]
    assert [m["name"] for m in smr.json("alice", "ls", "acme", "--json")] == ["bert"]
    versions = smr.json("alice", "ls", "acme/bert", "--json")
    assert [(v["number"], v["state"]) for v in versions] == [(1, "draft")]
    files = smr.json("alice", "--json", "ls", "acme/bert:1")
    assert sorted(f["path"] for f in files) == ["config.json", "w/weights.bin"]
    assert smr.json("carol", "show", "acme/bert", "--json")["name"] == "bert"
    shown = smr.json("carol", "show", "acme/bert:1", "--json")
    assert (shown["number"], shown["state"], shown["total_size"]) == (1, "draft", 1008)
    text = smr.run("carol", "show", "acme/bert:1").stdout
    assert "state:       draft" in text and "w/weights.bin" in text

    # Submit, scan (the worker's service, in-process), follow the scan job.
    submitted = smr.json("alice", "submit", "acme/bert:1", "--json")
    assert submitted["version"]["state"] == "scanning"
    job_id = submitted["job"]["id"]
    assert job_id == scan_job_id("acme", "bert", 1)
    assert job_id in [j["id"] for j in smr.json("alice", "jobs", "--json")]
    assert smr.json("alice", "jobs", job_id, "--json")["state"] == "queued"
    assert scan("acme", "bert", 1) == "pending_review"
    followed = smr.json("alice", "jobs", job_id, "--follow", "--json")
    assert followed["state"] == "succeeded"
    reports = smr.json("bob", "scans", "acme/bert:1", "--json")
    assert sorted(r["path"] for r in reports) == ["config.json", "w/weights.bin"]
    assert {r["verdict"] for r in reports} <= {"clean", "info"}

    # Review, alias.
    reviewed = smr.json("bob", "review", "approve", "acme/bert:1", "-m", "looks fine", "--json")
    assert reviewed["review"] == {**reviewed["review"], "decision": "approve", "reviewer": "bob"}
    assert reviewed["review"]["comment"] == "looks fine"
    assert reviewed["version"]["state"] == "approved"
    sign("acme", "bert", 1)

    # A local folder checked against the version's registry signature.
    folder = tmp_path / "local"
    for path, data in FILES.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(data)
    checked = smr.json("carol", "sign-verify", str(folder), "acme/bert:1", "--json")
    assert (checked["ok"], checked["files"], checked["signature"]["verified"]) == (True, 2, True)
    assert smr.run("carol", "sign-verify", str(folder), "acme/bert:1").stdout.startswith("ok: ")
    stranger = tmp_path / "stranger.pem"
    stranger.write_bytes(
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    result = smr.run(
        "carol", "sign-verify", str(folder), "acme/bert:1", "--trusted-key", str(stranger), code=3
    )
    assert result.stderr.startswith("smr: error: untrusted_key: ")
    (folder / "w/weights.bin").write_bytes(b"\x01" * 1000)
    result = smr.run("carol", "--json", "sign-verify", str(folder), "acme/bert:1", code=3)
    error = json.loads(result.stderr)["error"]
    assert (error["code"], error["extra"]["changed"]) == ("files_mismatch", ["w/weights.bin"])
    alias = smr.json("root", "alias", "set", "acme/bert", "production", "1", "--json")
    assert (alias["name"], alias["version"]) == ("production", 1)
    assert smr.json("carol", "--json", "show", "acme/bert@production")["number"] == 1
    assert smr.run("root", "alias", "set", "acme/bert", "staging", "1").stdout == (
        "acme/bert@staging -> 1\n"
    )
    removed = smr.json("root", "alias", "rm", "acme/bert", "production", "--json")
    assert removed == {"namespace": "acme", "model": "bert", "alias": "production", "deleted": True}
    assert smr.json("carol", "show", "acme/bert", "--json")["aliases"] == {"staging": 1}

    # The audit log (dave audits acme).
    events = smr.json("dave", "audit", "events", "--limit", "3", "--json")
    assert len(events) == 3
    assert [e["seq"] for e in events] == sorted((e["seq"] for e in events), reverse=True)
    submits = smr.json("dave", "audit", "events", "--action", "version.submit", "--json")
    assert [(e["action"], e["actor"]["user"]) for e in submits] == [("version.submit", "alice")]
    exported = smr.json("dave", "audit", "export", "--namespace", "acme", "--json")
    lines = smr.run("dave", "audit", "export", "--namespace", "acme").stdout.splitlines()
    assert [json.loads(line)["seq"] for line in lines] == [e["seq"] for e in exported]
    assert len(exported) >= 8
    assert smr.json("dave", "audit", "export", "--actor", "nobody", "--json") == []
    verified = smr.json("dave", "audit", "verify", "--json")
    assert verified["ok"] is True and verified["entries"] >= len(exported)

    # Tokens: the new one is printed once, works, and stops working once revoked.
    created = smr.json(
        "alice",
        "tokens",
        "create",
        "--name",
        "ci",
        "--scopes",
        "read",
        "--expires-days",
        "1",
        "--json",
    )
    assert (created["name"], created["scopes"]) == ("ci", ["read"])
    new_token = created["token"]
    assert [m["name"] for m in smr.json(None, "ls", "acme", "--json", SMR_TOKEN=new_token)] == [
        "bert"
    ]
    listed = smr.json("alice", "tokens", "ls", "--json")
    assert created["id"] in [t["id"] for t in listed]
    assert "token" not in listed[0]
    revoked = smr.json("alice", "tokens", "revoke", created["id"], "--json")
    assert revoked == {"id": created["id"], "revoked": True}
    smr.run(None, "ls", "acme", code=4, SMR_TOKEN=new_token)
    text = smr.run("alice", "tokens", "create", "--scopes", "read,write")
    assert re.fullmatch(r"\S{20,}\n", text.stdout), "text mode prints the token alone"
    assert "shown this once" in text.stderr

    # Differential privacy: a registered dataset, its budget, a preview and a retraining job.
    from tests.support.dp import digits_dataset

    digits_dataset(actors)
    budget = smr.json("alice", "dp", "budget", "acme", "digits", "--json")
    assert [(b["block"], b["cap_epsilon"], b["runs"]) for b in budget["blocks"]] == [("b1", 10, 0)]
    preview = smr.json(
        "alice",
        "dp",
        "preview",
        "acme",
        "digits",
        "--blocks",
        "b1",
        "--sampling-rate",
        "0.01",
        "--noise-multiplier",
        "1.0",
        "--steps",
        "100",
        "--json",
    )
    assert preview["fits"] is True and 0 < preview["epsilon"] < 10
    job = smr.json(
        "alice",
        "dp",
        "retrain",
        "acme",
        "digits",
        "--model",
        "digits-dp",
        "--noise-multiplier",
        "1.5",
        "--epochs",
        "1",
        "--batch-size",
        "64",
        "--family",
        "mlp",
        "--hidden",
        "16,8",
        "--json",
    )
    assert (job["kind"], job["state"]) == ("dp_retrain", "queued")
    budget = smr.json("alice", "--json", "dp", "budget", "acme", "digits")
    assert budget["blocks"][0]["reserved_epsilon"] > 0  # the job's claim

    # The local cache (empty here: nothing was pulled).
    listing = smr.json("alice", "cache", "ls", "--json")
    assert (listing["snapshots"], listing["blobs"]["count"]) == ([], 0)
    assert smr.json("alice", "cache", "verify", "--json")["bad"] == []
    assert smr.json("alice", "--json", "cache", "prune")["removed_blobs"] == []


# --- Exit codes --------------------------------------------------------------------------------


def test_exit_codes_say_what_went_wrong(smr, registry_server, tokens):
    draft(registry_server, tokens)
    # 2: usage, whether argparse or smr finds it.
    smr.run("alice", code=2)
    smr.run("alice", "show", "not-a-ref", code=2)
    smr.run("alice", "frobnicate", code=2)
    smr.run("alice", "submit", "acme/bert", code=2)  # no version
    smr.run("alice", "tokens", "create", "--scopes", ",", code=2)
    smr.run("alice", "dp", "retrain", "acme", "d", "--model", "m", code=2)  # no noise or target
    smr.run("alice", "jobs", "--follow", code=2)
    smr.run("alice", "ls", code=2, SMR_URL="")  # nowhere to go

    # 4: mallory administers evil and sees nothing of acme; carol may not review.
    result = smr.run("mallory", "show", "acme/bert", code=4)
    assert result.stdout == ""
    assert result.stderr.startswith("smr: error: not_found: ")
    error = json.loads(smr.run("mallory", "show", "acme/bert:1", "--json", code=4).stderr)
    assert (error["error"]["code"], error["error"]["status"]) == ("not_found", 404)
    smr.run("mallory", "ls", "acme/bert", code=4)
    smr.run("carol", "review", "approve", "acme/bert:1", code=4)
    smr.run("alice", "show", "acme/nope", code=4)

    # 1: the server refuses (409: an alias needs an approved version).
    result = smr.run("root", "alias", "set", "acme/bert", "production", "1", code=1)
    assert result.stderr.startswith("smr: error: version_not_approved: ")
    error = json.loads(
        smr.run("root", "--json", "alias", "set", "acme/bert", "p", "1", code=1).stderr
    )
    assert (error["error"]["code"], error["error"]["status"]) == ("version_not_approved", 409)

    # 0, and -q leaves stderr empty.
    result = smr.run("alice", "-q", "tokens", "create", "--scopes", "read")
    assert result.stderr == "" and result.stdout.strip()


# --- Following jobs; the process list ----------------------------------------------------------


def wait_for(predicate, what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_follow_waits_for_the_job_and_the_token_stays_out_of_the_process_list(
    smr, registry_server, tokens, actors
):
    from registry.models import Job, JobKind
    from tests.support.dp import digits_dataset

    digits_dataset(actors)
    env = smr.env("alice", SMR_POLL_INTERVAL="0.2")
    proc = popen_smr(
        [
            "dp",
            "retrain",
            "acme",
            "digits",
            "--model",
            "m",
            "--target-epsilon",
            "2",
            "--follow",
            "--json",
        ],
        env,
    )
    try:
        job = wait_for(
            lambda: Job.objects.filter(kind=JobKind.DP_RETRAIN).first(), "the retrain job"
        )
        # While it follows the job: the token is in its environment, never in its arguments.
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes()
        assert b"--follow" in cmdline  # the right process
        assert tokens["alice"].encode() not in cmdline
        assert f"SMR_TOKEN={tokens['alice']}".encode() in environ.split(b"\0")
        assert proc.poll() is None
        assert proc.stderr is not None
        seen = [proc.stderr.readline() for _ in range(2)]  # "Started job ...", "[queued 0%]"
        assert seen[1] == "[queued 0%]\n", seen
        response = api(registry_server, tokens["alice"], "POST", f"/jobs/{job.pk}/cancel")
        assert response.status_code == 200, response.text
        stdout, rest = proc.communicate(timeout=60)
        stderr = "".join(seen) + rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    smr.check(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), [])
    assert proc.returncode == 1, stderr  # the job did not succeed
    assert json.loads(stdout)["state"] == "cancelled"
    assert f"Started job {job.pk}" in stderr
    assert "[cancelled 0%]" in stderr
    error = json.loads(stderr.splitlines()[-1])["error"]
    assert (error["code"], error["message"]) == ("cancelled", "Cancelled before it started.")

    # A job that succeeds: exit 0, its state changes on stderr; -q keeps stderr quiet.
    draft(registry_server, tokens)
    api(registry_server, tokens["alice"], "POST", "/namespaces/acme/models/bert/versions/1/submit")
    job_id = scan_job_id("acme", "bert", 1)
    loud = popen_smr(["jobs", job_id, "--follow"], env)
    quiet = popen_smr(["jobs", job_id, "--follow", "-q"], env)
    try:
        assert loud.stderr is not None
        first = loud.stderr.readline()  # its first look at the job, before the scan runs
        assert first == "[queued 0%]\n", first
        assert loud.poll() is None
        assert tokens["alice"].encode() not in Path(f"/proc/{loud.pid}/cmdline").read_bytes()
        assert scan("acme", "bert", 1) == "pending_review"
        out, err = loud.communicate(timeout=60)
        err = first + err
        quiet_out, quiet_err = quiet.communicate(timeout=60)
    finally:
        for p in (loud, quiet):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert loud.returncode == 0 and quiet.returncode == 0, err
    assert out.startswith(f"{job_id}  scan ") and "succeeded" in out.splitlines()[0]
    assert "[queued 0%]" in err and "[succeeded 100%]" in err
    assert quiet_err == "" and quiet_out == out


# --- push and pull -----------------------------------------------------------------------------


def run_on_a_terminal(args: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    """`smr` with stderr on a pseudo-terminal (as in an interactive shell): (code, stdout,
    what the terminal showed)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        smr_argv(args), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave
    )
    os.close(slave)
    shown = b""
    try:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every holder of the terminal's other end has closed it
                break
            if not chunk:
                break
            shown += chunk
        assert proc.stdout is not None
        stdout = proc.stdout.read().decode()
        code = proc.wait(timeout=120)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return code, stdout, shown.decode(errors="replace")


def test_push_and_pull_print_json_and_draw_bars_only_on_a_terminal(
    smr, registry_server, tokens, tmp_path
):
    folder = tmp_path / "model"
    files = {
        "config.json": b'{"layers": 2}',
        "weights/a.bin": bytes(range(256)) * (3 << 12),
        "weights/b.bin": b"\x07" * 100_000,
        "notes.txt": b"not pushed",
    }
    for path, data in files.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(data)

    pushed = smr.json(
        "alice",
        "push",
        "acme/m",
        str(folder),
        "--exclude",
        "*.txt",
        "--tag",
        "team=nlp",
        "--description",
        "first",
        "--submit",
        "--workers",
        "2",
        "--json",
    )
    assert (pushed["ref"], pushed["version"], pushed["submitted"]) == ("acme/m:1", 1, True)
    assert sorted(f["path"] for f in pushed["files"]) == [
        "config.json",
        "weights/a.bin",
        "weights/b.bin",
    ]
    shown = smr.json("alice", "show", "acme/m:1", "--json")
    assert (shown["state"], shown["tags"], shown["description"]) == (
        "scanning",
        {"team": "nlp"},
        "first",
    )
    approve(registry_server, tokens, "acme", "m", 1, submit_as=None)

    dest = tmp_path / "dest"
    pulled = smr.json("carol", "pull", "acme/m:1", str(dest), "--json")
    assert (pulled["ref"], pulled["path"]) == ("acme/m:1", str(dest))
    assert pulled["signature"]["verified"] is True
    for path, data in files.items():
        assert (
            not (dest / path).exists()
            if path.endswith(".txt")
            else ((dest / path).read_bytes() == data)
        )
    only = smr.json(
        "carol", "--json", "pull", "acme/m:1", str(tmp_path / "only"), "--include", "*.json"
    )
    assert [f["path"] for f in only["files"]] == ["config.json"]
    # Text: the path alone on stdout (the cache's snapshot, without DEST).
    snapshot = Path(smr.run("carol", "pull", "acme/m:1").stdout.strip())
    assert (snapshot / "weights/a.bin").read_bytes() == files["weights/a.bin"]
    listing = smr.json("carol", "cache", "ls", "--json")
    assert [(s["ref"], s["files"]) for s in listing["snapshots"]] == [("acme/m:1", 3)]

    # On a terminal the bars show (the control of the checks above), and -q hides them; a new
    # cache each time, so the files really download.
    env = smr.env("carol")
    code, stdout, terminal = run_on_a_terminal(
        ["pull", "acme/m:1"], {**env, "XDG_CACHE_HOME": str(tmp_path / "c1")}
    )
    assert code == 0, terminal
    # (The terminal shows each newline as \r\n: only the bars' own carriage returns count.)
    assert BAR_MARKS.search(terminal.replace("\r\n", "\n")), terminal
    assert "pull acme/m:1: 100%|" in terminal
    assert stdout.strip().startswith(str(tmp_path / "c1"))
    code, _, terminal = run_on_a_terminal(
        ["pull", "acme/m:1", "-q"], {**env, "XDG_CACHE_HOME": str(tmp_path / "c2")}
    )
    assert code == 0
    assert terminal == ""
    for token in tokens.values():
        assert token not in terminal
