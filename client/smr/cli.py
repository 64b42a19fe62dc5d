"""The `smr` command: push and pull whole models, and every registry chore from a terminal.

Data goes to stdout (text, or JSON with --json), messages and progress bars to stderr. Exit
codes: 0 ok, 1 error, 2 usage, 3 verification failed, 4 not found or forbidden. The token
comes from `smr login` (a prompt or stdin) or SMR_TOKEN, never from the command line, where
any user on the machine could read it in the process list.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import itertools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from smr import __version__, config
from smr.errors import EXIT_ERROR, EXIT_OK, EXIT_USAGE, EXIT_VERIFY, SmrError, UsageError
from smr.http import API, Api, raise_for
from smr.output import Output, human_size, table_lines
from smr.refs import Ref, parse_ref
from smr.sdk import Registry

JOB_FINISHED = ("succeeded", "failed", "cancelled")
# How often `--follow` asks about a job (seconds); SMR_POLL_INTERVAL overrides it.
POLL_INTERVAL = 1.0


class Context:
    """One command's output and, on first use, its registry connection."""

    def __init__(self, out: Output) -> None:
        self.out = out
        self._registry: Registry | None = None

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            settings = config.load()
            self.out.secrets.append(settings.token)
            self._registry = Registry(settings.url, settings.token)
        return self._registry

    @property
    def api(self) -> Api:
        return self.registry.api

    def close(self) -> None:
        if self._registry is not None:
            self._registry.close()


Handler = Callable[[argparse.Namespace, Context], int | None]


# --- Argument types ----------------------------------------------------------------------------


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be 1 or more")
    return value


def csv_list(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError("give at least one value (comma-separated)")
    return items


def int_list(text: str) -> list[int]:
    try:
        return [int(item) for item in csv_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of whole numbers") from None


def key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def ref_arg(text: str) -> Ref:
    try:
        return parse_ref(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def need_version(ref: Ref) -> Ref:
    if ref.selector is None:
        raise UsageError(f"{ref} names no version: use {ref}:VERSION or {ref}@ALIAS.")
    return ref


def model_only(ref: Ref) -> Ref:
    if ref.selector is not None:
        raise UsageError(f"{ref} names a version: give the model alone (NS/MODEL).")
    return ref


# --- login -------------------------------------------------------------------------------------


def read_token() -> str:
    """The token from a hidden prompt on a terminal, else the first line of stdin."""
    if sys.stdin is not None and sys.stdin.isatty():
        return getpass.getpass("Token: ").strip()
    line = sys.stdin.readline() if sys.stdin is not None else ""
    return line.strip()


def cmd_login(args: argparse.Namespace, ctx: Context) -> None:
    url = (args.url or os.environ.get("SMR_URL") or "").rstrip("/")
    if not url:
        raise UsageError("Give the registry's address: smr login --url URL.")
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"{url!r} is not an http(s) URL.")
    token = read_token()
    if not token:
        raise UsageError("No token read: paste it at the prompt or pipe it on stdin.")
    ctx.out.secrets.append(token)
    with Api(url, token) as api:
        me = api.json("GET", "/auth/me")
    path = config.save(url, token)
    ctx.out.info(f"Logged in to {url} as {me['username']}; credentials in {path} (mode 0600).")
    ctx.out.data(
        {
            "url": url,
            "username": me["username"],
            "namespaces": me.get("namespaces", []),
            "credentials": str(path),
        },
        text=me["username"],
    )


# --- push / pull -------------------------------------------------------------------------------


def cmd_push(args: argparse.Namespace, ctx: Context) -> None:
    source = Path(args.path)
    if not source.exists():
        raise UsageError(f"{source} does not exist.")
    bars = ctx.out.progress(f"push {args.ref}")
    try:
        result = ctx.registry.push(
            args.ref,
            source,
            include=args.include,
            exclude=args.exclude,
            submit=args.submit,
            tags=dict(args.tag) if args.tag else None,
            description=args.description,
            workers=args.workers,
            progress=bars,
        )
    finally:
        if bars is not None:
            bars.close()
    name = f"{result.ref.namespace}/{result.ref.model}:{result.version}"
    size = sum(int(f.get("size") or 0) for f in result.files)
    ctx.out.info(
        f"Pushed {name}: {len(result.files)} files ({human_size(size)}), "
        f"{human_size(result.bytes_sent)} sent"
        + ("; submitted for scanning." if result.submitted else ".")
    )
    body = {
        "ref": name,
        "namespace": result.ref.namespace,
        "model": result.ref.model,
        "version": result.version,
        "files": result.files,
        "bytes_sent": result.bytes_sent,
        "submitted": result.submitted,
    }
    ctx.out.data(body, text=name)


def cmd_pull(args: argparse.Namespace, ctx: Context) -> None:
    bars = ctx.out.progress(f"pull {args.ref}")
    try:
        result = ctx.registry.pull_result(
            args.ref,
            args.dest,
            include=args.include,
            exclude=args.exclude,
            trusted_key=args.trusted_key,
            workers=args.workers,
            progress=bars,
        )
    finally:
        if bars is not None:
            bars.close()
    name = f"{result.ref.namespace}/{result.ref.model}:{result.version}"
    ctx.out.info(
        f"Pulled {name}: {len(result.files)} files, {human_size(result.bytes_received)} "
        f"received; digests{' and signature' if result.signature else ''} verified."
    )
    body = {
        "ref": name,
        "namespace": result.ref.namespace,
        "model": result.ref.model,
        "version": result.version,
        "path": str(result.path),
        "files": result.files,
        "bytes_received": result.bytes_received,
        "signature": result.signature,
    }
    ctx.out.data(body, text=str(result.path))


# --- Reading the catalog -----------------------------------------------------------------------


def cmd_ls(args: argparse.Namespace, ctx: Context) -> None:
    target: str | None = args.target
    api = ctx.api
    if target is None:
        items = list(api.pages("/namespaces"))
        rows = [[n["name"], n.get("description") or ""] for n in items]
        ctx.out.table(items, rows, ["namespace", "description"])
    elif "/" not in target:
        items = list(api.pages(f"/namespaces/{target}/models"))
        rows = [
            [m["name"], m.get("aliases") or {}, m.get("updated_at"), m.get("description") or ""]
            for m in items
        ]
        ctx.out.table(items, rows, ["model", "aliases", "updated", "description"])
    else:
        ref = parse_ref(target)  # a UsageError (exit 2) when malformed
        if ref.selector is None:
            items = list(api.pages(f"{ref.model_path}/versions"))
            rows = [
                [
                    v["number"],
                    v["state"],
                    v.get("aliases") or [],
                    v.get("created_by"),
                    v["created_at"],
                ]
                for v in items
            ]
            ctx.out.table(items, rows, ["version", "state", "aliases", "created by", "created"])
        else:
            items = list(api.pages(f"{ref.version_path()}/files"))
            rows = [[f["path"], human_size(f["size"]), f["sha256"]] for f in items]
            ctx.out.table(items, rows, ["path", "size", "sha256"])


def cmd_show(args: argparse.Namespace, ctx: Context) -> None:
    ref: Ref = args.ref
    if ref.selector is None:
        model = ctx.api.json("GET", ref.model_path)
        aliases = model.get("aliases") or {}
        lines = [
            f"model:       {model['namespace']}/{model['name']}",
            f"description: {model.get('description') or '-'}",
            f"tags:        {_pairs(model.get('tags'))}",
            f"aliases:     {_pairs(aliases)}",
            f"created:     {model.get('created_at')}",
            f"updated:     {model.get('updated_at')}",
        ]
        ctx.out.data(model, lines)
        return
    version = ctx.api.json("GET", ref.version_path())
    ctx.out.data(version, version_lines(version))


def _pairs(mapping: dict[str, Any] | None) -> str:
    return ", ".join(f"{k}={v}" for k, v in (mapping or {}).items()) or "-"


def version_lines(v: dict[str, Any]) -> Iterator[str]:
    yield f"version:     {v['namespace']}/{v['model']}:{v['number']}"
    yield f"state:       {v['state']}"
    yield f"description: {v.get('description') or '-'}"
    yield f"tags:        {_pairs(v.get('tags'))}"
    yield f"aliases:     {', '.join(v.get('aliases') or []) or '-'}"
    yield f"created:     {v.get('created_at')} by {v.get('created_by') or '-'}"
    if v.get("submitted_at"):
        yield f"submitted:   {v['submitted_at']} by {v.get('submitted_by') or '-'}"
    if v.get("approved_at"):
        yield f"approved:    {v['approved_at']} ({v.get('approvals', 0)} approvals)"
    files = v.get("files") or []
    yield f"files:       {len(files)} ({human_size(v.get('total_size'))})"
    for f in files:
        yield f"  {f['sha256'][:12]}  {human_size(f['size']):>10}  {f['path']}"
    scans = v.get("scans") or []
    if scans:
        yield "scans:"
        for s in scans:
            yield f"  {s['verdict']:<11} {s.get('max_severity') or '-':<8} {s['path']}"
    for r in v.get("reviews") or []:
        comment = f": {r['comment']}" if r.get("comment") else ""
        yield f"review:      {r['decision']} by {r.get('reviewer') or '-'}{comment}"
    if v.get("dp_record"):
        dp = v["dp_record"]
        yield f"dp:          epsilon {dp['epsilon']:.4g} at delta {dp['delta']:g} ({dp['dataset']})"


def cmd_scans(args: argparse.Namespace, ctx: Context) -> None:
    ref = need_version(args.ref)
    reports = list(ctx.api.pages(f"{ref.version_path()}/scans"))
    lines = []
    for r in reports:
        findings = r.get("findings") or []
        lines.append(
            f"{r['verdict']:<11} {r.get('max_severity') or '-':<8} {len(findings):>3} findings  "
            f"{r['path']}  ({r.get('scanner_version')}, {r.get('created_at')})"
        )
        for f in findings:
            where = f" [{f['member']}]" if f.get("member") else ""
            lines.append(f"    {f['severity']:<8} {f['rule']}{where}: {f['message']}")
    ctx.out.data(reports, lines)


# --- Changing versions -------------------------------------------------------------------------


def cmd_submit(args: argparse.Namespace, ctx: Context) -> None:
    ref = need_version(args.ref)
    body = ctx.api.json("POST", f"{ref.version_path()}/submit")
    version, job = body["version"], body["job"]
    ctx.out.info(f"Submitted; the scan job is {job['id']} (smr jobs {job['id']} --follow).")
    ctx.out.data(
        body, f"{version['namespace']}/{version['model']}:{version['number']} {version['state']}"
    )


def cmd_review(args: argparse.Namespace, ctx: Context) -> None:
    ref = need_version(args.ref)
    body = ctx.api.json(
        "POST",
        f"{ref.version_path()}/reviews",
        json={"decision": args.decision, "comment": args.message or ""},
    )
    version = body["version"]
    name = f"{version['namespace']}/{version['model']}:{version['number']}"
    ctx.out.data(body, f"{name} {version['state']}")


def cmd_alias_set(args: argparse.Namespace, ctx: Context) -> None:
    ref = model_only(args.ref)
    body = ctx.api.json(
        "PUT", f"{ref.model_path}/aliases/{args.alias}", json={"version": args.version}
    )
    ctx.out.data(body, f"{ref}@{body['name']} -> {body['version']}")


def cmd_alias_rm(args: argparse.Namespace, ctx: Context) -> None:
    ref = model_only(args.ref)
    ctx.api.request("DELETE", f"{ref.model_path}/aliases/{args.alias}")
    ctx.out.info(f"Removed alias {ref}@{args.alias}.")
    ctx.out.data(
        {"namespace": ref.namespace, "model": ref.model, "alias": args.alias, "deleted": True},
        text="",
    )


def cmd_sign_verify(args: argparse.Namespace, ctx: Context) -> int:
    from smr import verify

    ref = need_version(args.ref)
    folder = Path(args.path)
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder.")
    result = verify.verify_folder(ctx.registry, ref, folder, args.trusted_key)
    signature = result["signature"]
    ctx.out.data(
        result,
        f"ok: {folder} holds the {result['files']} files of {result['ref']}, signed by the "
        f"registry's key {signature['key_id'][:16]} ({signature['trust']})",
    )
    return EXIT_OK


# --- Audit -------------------------------------------------------------------------------------


def audit_params(args: argparse.Namespace) -> dict[str, str]:
    names = ("action", "actor", "target", "namespace", "outcome", "sha256", "since", "until")
    return {name: getattr(args, name) for name in names if getattr(args, name, None)}


def cmd_audit_events(args: argparse.Namespace, ctx: Context) -> None:
    params: dict[str, Any] = audit_params(args)
    params["limit"] = min(args.limit, 1000)
    events = list(itertools.islice(ctx.api.pages("/audit/events", params), args.limit))
    rows = [
        [
            e["seq"],
            e["time"],
            (e.get("actor") or {}).get("user") or (e.get("actor") or {}).get("kind"),
            e["action"],
            e.get("target") or "-",
            e["outcome"],
        ]
        for e in events
    ]
    ctx.out.table(events, rows, ["seq", "time", "actor", "action", "target", "outcome"])


def cmd_audit_export(args: argparse.Namespace, ctx: Context) -> None:
    """Streams the export to stdout as it comes: JSON Lines, or one JSON array with --json."""
    api = ctx.api
    stdout = ctx.out.stdout
    count = 0
    with api.client.stream("GET", f"{API}/audit/events/export", params=audit_params(args)) as resp:
        if not resp.is_success:
            resp.read()
            raise_for(resp)
        if ctx.out.json_mode:
            stdout.write("[")
            for line in resp.iter_lines():
                if line.strip():
                    stdout.write(("\n" if count == 0 else ",\n") + line)
                    count += 1
            stdout.write("\n]\n" if count else "]\n")
        else:
            for line in resp.iter_lines():
                if line.strip():
                    stdout.write(line + "\n")
                    count += 1
    stdout.flush()
    ctx.out.info(f"Exported {count} events.")


def cmd_audit_verify(args: argparse.Namespace, ctx: Context) -> int:
    body = ctx.api.json("POST", "/audit/verify")
    if body["ok"]:
        text = f"ok: {body['entries']} entries, {body['checkpoints']} checkpoints verified"
    else:
        text = f"FAILED: the log does not verify at {json.dumps(body.get('first_bad'))}"
    ctx.out.data(body, text)
    return EXIT_OK if body["ok"] else EXIT_VERIFY


# --- Tokens ------------------------------------------------------------------------------------


def cmd_tokens_ls(args: argparse.Namespace, ctx: Context) -> None:
    items = list(ctx.api.pages("/tokens"))
    rows = [
        [
            t["id"],
            t.get("name") or "-",
            t["scopes"],
            t["created_at"],
            t.get("expires_at"),
            t.get("last_used_at"),
            "revoked" if t.get("revoked_at") else "",
        ]
        for t in items
    ]
    headers = ["id", "name", "scopes", "created", "expires", "last used", ""]
    ctx.out.table(items, rows, headers)


def cmd_tokens_create(args: argparse.Namespace, ctx: Context) -> None:
    body: dict[str, Any] = {"name": args.name or "", "scopes": args.scopes}
    if args.expires_days is not None:
        expires = datetime.now(UTC) + timedelta(days=args.expires_days)
        body["expires_at"] = expires.isoformat()
    created = ctx.api.json("POST", "/tokens", json=body)
    ctx.out.info(
        f"Created token {created['id']} ({','.join(created['scopes'])}, expires "
        f"{created.get('expires_at') or 'never'}). It is shown this once: store it now."
    )
    ctx.out.data(created, text=created["token"])


def cmd_tokens_revoke(args: argparse.Namespace, ctx: Context) -> None:
    ctx.api.request("DELETE", f"/tokens/{args.id}")
    ctx.out.info(f"Revoked token {args.id}.")
    ctx.out.data({"id": args.id, "revoked": True}, text="")


# --- Differential privacy ----------------------------------------------------------------------


def dataset_path(args: argparse.Namespace) -> str:
    return f"/namespaces/{args.namespace}/datasets/{args.dataset}"


def cmd_dp_budget(args: argparse.Namespace, ctx: Context) -> None:
    body = ctx.api.json("GET", f"{dataset_path(args)}/budget")
    rows = [
        [
            b["block"],
            b["accountant"],
            f"{b['cap_epsilon']:.4g}",
            f"{b['spent_epsilon']:.4g}",
            f"{b['reserved_epsilon']:.4g}",
            f"{b['remaining_epsilon']:.4g}",
            b["runs"],
        ]
        for b in body["blocks"]
    ]
    headers = ["block", "accountant", "cap", "spent", "reserved", "remaining", "runs"]
    ctx.out.table(body, rows, headers)


def cmd_dp_preview(args: argparse.Namespace, ctx: Context) -> None:
    event: dict[str, Any] = {
        "sampling_rate": args.sampling_rate,
        "noise_multiplier": args.noise_multiplier,
        "steps": args.steps,
    }
    if args.max_grad_norm is not None:
        event["max_grad_norm"] = args.max_grad_norm
    body = ctx.api.json(
        "POST", f"{dataset_path(args)}/ledger/preview", json={"blocks": args.blocks, "event": event}
    )
    lines = [
        f"epsilon {body['epsilon']:.4g} at delta {body['delta']:g} ({body['accountant']}); "
        f"fits: {'yes' if body['fits'] else 'no'}"
    ]
    rows = [
        [
            b["block"],
            f"{b['epsilon']:.4g}",
            f"{b['epsilon_after']:.4g}",
            f"{b['remaining_after']:.4g}",
            "yes" if b["fits"] else "no",
        ]
        for b in body["blocks"]
    ]
    lines += table_lines(rows, ["block", "epsilon", "used after", "remaining after", "fits"])
    ctx.out.data(body, lines)


def cmd_dp_retrain(args: argparse.Namespace, ctx: Context) -> int:
    body: dict[str, Any] = {
        "kind": "dp_retrain",
        "namespace": args.namespace,
        "dataset": args.dataset,
        "model": args.model,
    }
    optional = {
        "blocks": args.blocks,
        "base_version": args.base_version,
        "target_epsilon": args.target_epsilon,
        "noise_multiplier": args.noise_multiplier,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "max_grad_norm": args.max_grad_norm,
        "learning_rate": args.learning_rate,
        "family": args.family,
        "hidden": args.hidden,
        "seed": args.seed,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    job = ctx.api.json("POST", "/jobs", json=body)
    ctx.out.info(f"Started job {job['id']} (smr jobs {job['id']} --follow).")
    if args.follow:
        return follow_job(ctx, job["id"])
    ctx.out.data(job, text=job["id"])
    return EXIT_OK


# --- Jobs --------------------------------------------------------------------------------------


def job_line(job: dict[str, Any]) -> str:
    where = ""
    if job.get("namespace"):
        where = job["namespace"]
        if job.get("model"):
            where += f"/{job['model']}" + (f":{job['version']}" if job.get("version") else "")
    return (
        f"{job['id']}  {job['kind']:<13} {job['state']:<9} {job['progress'] * 100:5.1f}%  {where}"
    )


def cmd_jobs(args: argparse.Namespace, ctx: Context) -> int:
    if args.id is None:
        if args.follow:
            raise UsageError("--follow needs a job id: smr jobs ID --follow.")
        jobs = list(
            itertools.islice(ctx.api.pages("/jobs", {"limit": min(args.limit, 1000)}), args.limit)
        )
        ctx.out.data(jobs, [job_line(j) for j in jobs])
        return EXIT_OK
    if args.follow:
        return follow_job(ctx, args.id)
    job = ctx.api.json("GET", f"/jobs/{args.id}")
    ctx.out.data(job, job_lines(job))
    return EXIT_OK


def job_lines(job: dict[str, Any]) -> list[str]:
    lines = [job_line(job)]
    if job.get("progress_message"):
        lines.append(f"  {job['progress_message']}")
    if job.get("error_code") or job.get("error_message"):
        lines.append(f"  error: {job.get('error_code')}: {job.get('error_message')}")
    if job.get("result"):
        lines.append(f"  result: {json.dumps(job['result'], sort_keys=True)}")
    return lines


def follow_job(ctx: Context, job_id: str) -> int:
    """Poll a job until it finishes, its progress messages on stderr; exit 1 unless it
    succeeded."""
    interval = float(os.environ.get("SMR_POLL_INTERVAL") or POLL_INTERVAL)
    seen: tuple[str, str] | None = None
    while True:
        job = ctx.api.json("GET", f"/jobs/{job_id}")
        now = (job["state"], job.get("progress_message") or "")
        if now != seen:
            message = f": {now[1]}" if now[1] else ""
            ctx.out.info(f"[{job['state']} {job['progress'] * 100:.0f}%]{message}")
            seen = now
        if job["state"] in JOB_FINISHED:
            break
        time.sleep(interval)
    ctx.out.data(job, job_lines(job))
    if job["state"] != "succeeded":
        ctx.out.error(
            SmrError(
                job.get("error_message") or f"The job ended {job['state']}.",
                code=job.get("error_code") or f"job_{job['state']}",
            )
        )
        return EXIT_ERROR
    return EXIT_OK


# --- Cache -------------------------------------------------------------------------------------


def cmd_cache(args: argparse.Namespace, ctx: Context) -> int:
    from smr import cache

    out = ctx.out
    if args.cache_command == "ls":
        listing = cache.cache_ls()
        rows = [
            [s["ref"], s["files"], human_size(s["bytes"]), s["missing"] or "", s["path"]]
            for s in listing["snapshots"]
        ]
        lines = table_lines(rows, ["version", "files", "size", "missing", "path"])
        blobs = listing["blobs"]
        lines.append(
            f"{blobs['count']} blobs ({human_size(blobs['bytes'])}) in {listing['path']}"
            + (f"; {len(listing['partial'])} partial downloads" if listing["partial"] else "")
        )
        out.data(listing, lines)
        return EXIT_OK
    if args.cache_command == "verify":
        report = cache.cache_verify()
        lines = [f"{report['checked']} blobs checked: {report['ok']} ok, {len(report['bad'])} bad"]
        lines += [f"  bad (removed): {b['sha256']}" for b in report["bad"]]
        out.data(report, lines)
        return EXIT_VERIFY if report["bad"] else EXIT_OK
    report = cache.cache_prune(older_than_days=args.older_than_days)
    out.data(
        report,
        f"{len(report['removed_blobs'])} blobs removed ({human_size(report['freed_bytes'])} "
        f"freed), {len(report['removed_snapshots'])} snapshots, "
        f"{report['removed_links']} broken links",
    )
    return EXIT_OK


# --- The parser --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    # Global flags live in a parent parser shared by every level, with SUPPRESS defaults so a
    # subcommand's parser does not reset one given before the subcommand (`smr --json ls`).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print the result as JSON on stdout",
    )
    common.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="no progress bars or messages on stderr (errors still are)",
    )
    parser = argparse.ArgumentParser(
        prog="smr",
        parents=[common],
        description="Secure Model Registry client. Exit codes: 0 ok, 1 error, 2 usage, "
        "3 verification failed, 4 not found or forbidden.",
    )
    parser.add_argument("--version", action="version", version=f"smr {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        group: Any, name: str, handler: Handler, text: str, **kwargs: Any
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = group.add_parser(
            name, parents=[common], help=text, description=text, **kwargs
        )
        p.set_defaults(handler=handler)
        return p

    def groups(name: str, text: str, dest: str) -> Any:
        p = sub.add_parser(name, parents=[common], help=text, description=text)
        return p.add_subparsers(dest=dest, required=True, metavar="ACTION")

    p = command(sub, "login", cmd_login, "store the registry URL and a token (read from stdin)")
    p.add_argument("--url", help="the registry, e.g. https://registry.example (or SMR_URL)")

    def filters(p: argparse.ArgumentParser) -> None:
        p.add_argument("--include", action="append", default=[], metavar="GLOB")
        p.add_argument("--exclude", action="append", default=[], metavar="GLOB")
        p.add_argument("--workers", type=positive_int, default=4, metavar="N")

    p = command(sub, "push", cmd_push, "upload a folder as a new version of a model")
    p.add_argument("ref", type=ref_arg, metavar="NS/MODEL")
    p.add_argument("path", metavar="PATH")
    filters(p)
    p.add_argument("--submit", action="store_true", help="submit for scanning and review")
    p.add_argument("--tag", action="append", type=key_value, default=[], metavar="KEY=VALUE")
    p.add_argument("--description", default="", metavar="TEXT")

    p = command(sub, "pull", cmd_pull, "download a version, verified, and print its path")
    p.add_argument("ref", type=ref_arg, metavar="NS/MODEL[@ALIAS|:VERSION]")
    p.add_argument("dest", nargs="?", default=None, metavar="DEST")
    filters(p)
    p.add_argument("--trusted-key", metavar="PEM", help="the registry's public key to trust")

    p = command(sub, "ls", cmd_ls, "namespaces, a namespace's models, or a model's versions")
    p.add_argument("target", nargs="?", metavar="NS[/MODEL[:VERSION]]")

    p = command(sub, "show", cmd_show, "a model's or a version's details")
    p.add_argument("ref", type=ref_arg, metavar="NS/MODEL[:VERSION|@ALIAS]")

    p = command(sub, "submit", cmd_submit, "submit a draft version for scanning and review")
    p.add_argument("ref", type=ref_arg, metavar="NS/MODEL:VERSION")

    p = command(sub, "scans", cmd_scans, "a version's scan reports and findings")
    p.add_argument("ref", type=ref_arg, metavar="NS/MODEL:VERSION")

    review = groups("review", "approve or reject a version pending review", "review_command")
    for decision in ("approve", "reject"):
        p = command(review, decision, cmd_review, f"{decision} a version")
        p.set_defaults(decision=decision)
        p.add_argument("ref", type=ref_arg, metavar="NS/MODEL:VERSION")
        p.add_argument("-m", "--message", default="", metavar="COMMENT")

    alias = groups("alias", "point an alias at an approved version, or remove it", "alias_command")
    p = command(alias, "set", cmd_alias_set, "point ALIAS at VERSION")
    p.add_argument("ref", type=ref_arg, metavar="NS/MODEL")
    p.add_argument("alias", metavar="ALIAS")
    p.add_argument("version", type=positive_int, metavar="VERSION")
    p = command(alias, "rm", cmd_alias_rm, "remove ALIAS")
    p.add_argument("ref", type=ref_arg, metavar="NS/MODEL")
    p.add_argument("alias", metavar="ALIAS")

    p = command(
        sub, "sign-verify", cmd_sign_verify, "check a local folder against a version's signature"
    )
    p.add_argument("path", metavar="PATH")
    p.add_argument("ref", type=ref_arg, metavar="NS/MODEL:VERSION")
    p.add_argument("--trusted-key", metavar="PEM")

    audit = groups("audit", "the audit log (auditors and admins)", "audit_command")

    def audit_filters(p: argparse.ArgumentParser) -> None:
        p.add_argument("--action", metavar="A")
        p.add_argument("--actor", metavar="USER")
        p.add_argument("--target", metavar="PREFIX")
        p.add_argument("--namespace", metavar="NS")
        p.add_argument("--outcome", metavar="OUTCOME")
        p.add_argument("--sha256", metavar="DIGEST")
        p.add_argument("--since", metavar="TIME", help="RFC 3339, e.g. 2025-01-31T00:00:00Z")
        p.add_argument("--until", metavar="TIME")

    p = command(audit, "events", cmd_audit_events, "the latest events, newest first")
    audit_filters(p)
    p.add_argument("--limit", type=positive_int, default=100, metavar="N")
    p = command(audit, "export", cmd_audit_export, "every matching event as JSON Lines")
    audit_filters(p)
    command(audit, "verify", cmd_audit_verify, "check the log's hash chain and checkpoints")

    tokens = groups("tokens", "your API tokens", "tokens_command")
    command(tokens, "ls", cmd_tokens_ls, "list your tokens")
    p = command(tokens, "create", cmd_tokens_create, "create a token (printed once)")
    p.add_argument("--name", default="", metavar="NAME")
    p.add_argument("--scopes", type=csv_list, default=["read"], metavar="read,write,...")
    p.add_argument("--expires-days", type=positive_int, metavar="N")
    p = command(tokens, "revoke", cmd_tokens_revoke, "revoke a token")
    p.add_argument("id", metavar="ID")

    dp = groups("dp", "differential privacy: budgets, previews, DP-SGD retraining", "dp_command")
    p = command(dp, "budget", cmd_dp_budget, "spent and remaining epsilon per block")
    p.add_argument("namespace", metavar="NS")
    p.add_argument("dataset", metavar="DATASET")
    p = command(dp, "preview", cmd_dp_preview, "what a DP-SGD run would cost (reserves nothing)")
    p.add_argument("namespace", metavar="NS")
    p.add_argument("dataset", metavar="DATASET")
    p.add_argument("--blocks", type=csv_list, required=True, metavar="B1,B2")
    p.add_argument("--sampling-rate", type=float, required=True, metavar="Q")
    p.add_argument("--noise-multiplier", type=float, required=True, metavar="SIGMA")
    p.add_argument("--steps", type=positive_int, required=True, metavar="N")
    p.add_argument("--max-grad-norm", type=float, metavar="C")
    p = command(dp, "retrain", cmd_dp_retrain, "train a new version with DP-SGD (a job)")
    p.add_argument("namespace", metavar="NS")
    p.add_argument("dataset", metavar="DATASET")
    p.add_argument("--model", required=True, metavar="MODEL")
    noise = p.add_mutually_exclusive_group(required=True)
    noise.add_argument("--target-epsilon", type=float, metavar="E")
    noise.add_argument("--noise-multiplier", type=float, metavar="SIGMA")
    p.add_argument("--blocks", type=csv_list, metavar="B1,B2")
    p.add_argument("--base-version", type=positive_int, metavar="N")
    p.add_argument("--epochs", type=positive_int, metavar="N")
    p.add_argument("--batch-size", type=positive_int, metavar="N")
    p.add_argument("--max-grad-norm", type=float, metavar="C")
    p.add_argument("--learning-rate", type=float, metavar="LR")
    p.add_argument("--family", choices=["logreg", "mlp"])
    p.add_argument("--hidden", type=int_list, metavar="64,32")
    p.add_argument("--seed", type=int)
    p.add_argument("--follow", action="store_true", help="wait for the job to finish")

    p = command(sub, "jobs", cmd_jobs, "your jobs, or one job (--follow waits for it)")
    p.add_argument("id", nargs="?", metavar="ID")
    p.add_argument("--follow", action="store_true")
    p.add_argument("--limit", type=positive_int, default=50, metavar="N")

    cache = groups("cache", "the local cache of pulled files", "cache_command")
    command(cache, "ls", cmd_cache, "cached versions and blobs")
    command(cache, "verify", cmd_cache, "re-hash every cached blob")
    p = command(cache, "prune", cmd_cache, "delete blobs no snapshot uses")
    p.add_argument(
        "--older-than-days",
        type=float,
        metavar="N",
        help="also delete snapshots and partial downloads untouched for N days",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (argparse printed it)
        return (
            exc.code if isinstance(exc.code, int) else (EXIT_OK if exc.code is None else EXIT_USAGE)
        )
    out = Output(json_mode=getattr(args, "json", False), quiet=getattr(args, "quiet", False))
    ctx = Context(out)
    try:
        code = args.handler(args, ctx)
        return EXIT_OK if code is None else int(code)
    except SmrError as exc:
        out.error(exc)
        return exc.exit_code
    except KeyboardInterrupt:
        out.error(SmrError("Interrupted.", code="interrupted"))
        return 130
    except BrokenPipeError:
        # The reader went away (`smr audit export | head`): not an error of ours.
        with contextlib.suppress(OSError):
            # Silences the interpreter's flush of stdout at exit.
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        return EXIT_OK
    except Exception as exc:
        if os.environ.get("SMR_DEBUG"):
            raise
        out.error(SmrError(f"{type(exc).__name__}: {exc}", code="internal_error"))
        return EXIT_ERROR
    finally:
        ctx.close()


if __name__ == "__main__":
    sys.exit(main())
