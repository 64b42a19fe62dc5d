"""The upload page in a real browser, against the live server and a real Celery scan worker:
alice creates a model, uploads a folder (one file of 50 MiB) in parts, reloads mid-upload,
resumes by choosing the folder again, submits, and watches the scan end without reloading."""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import time
from pathlib import Path

import pytest
import redis
from playwright.sync_api import expect

from registry.models import Artifact, AuditEvent, UploadPart, UploadSession
from tests.dashboard.conftest import sign_in
from tests.workers.test_scan_worker import Workers

pytestmark = pytest.mark.django_db(transaction=True)

BROKER = "redis://127.0.0.1:6379/8"  # the scan worker tests use /14, test_tasks.py /15
PART = 2 << 20  # small parts, so that the reload surely lands between two of them
BIG = 50 << 20
LET_THROUGH = 6  # parts of a session sent before the "slow link" holds the rest
PARTS_URL = re.compile(r"/uploads/([0-9a-f-]{36})/parts/(\d+)$")


def write_safetensors(path: Path, size: int) -> None:
    """A real safetensors file of exactly `size` bytes: one uint8 tensor of random bytes
    (the scanner knows the format, so the version scans clean)."""
    header_len = 128
    n = size - 8 - header_len
    header = json.dumps({"weight": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}})
    with path.open("wb") as f:
        f.write(struct.pack("<Q", header_len) + header.encode().ljust(header_len))
        left = n
        while left:
            chunk = os.urandom(min(1 << 20, left))
            f.write(chunk)
            left -= len(chunk)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def wait_for(page, predicate, what: str, timeout: float = 30) -> None:
    # Waits inside Playwright (page.wait_for_timeout), so its route handlers keep running.
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        page.wait_for_timeout(100)


@pytest.fixture
def scan_worker(settings, tmp_path):
    redis.Redis.from_url(BROKER).flushdb()
    # The live server runs in this process: the submit's job goes to this broker.
    settings.CELERY_BROKER_URL = BROKER
    workers = Workers(settings, tmp_path)
    workers.env["CELERY_BROKER_URL"] = BROKER
    yield workers
    workers.stop()
    redis.Redis.from_url(BROKER).flushdb()


def test_upload_a_folder_resume_after_a_reload_submit_and_watch_the_scan(
    page, site, settings, tmp_path, scan_worker
):
    settings.SMR_UPLOAD_PART_SIZE = PART
    folder = tmp_path / "bert"
    (folder / "tokenizer").mkdir(parents=True)
    (folder / "config.json").write_text('{"hidden_size": 768, "layers": 12}\n')
    (folder / "tokenizer" / "vocab.txt").write_text("".join(f"tok{i}\n" for i in range(5000)))
    write_safetensors(folder / "model.safetensors", BIG)
    local = {
        "config.json": folder / "config.json",
        "tokenizer/vocab.txt": folder / "tokenizer" / "vocab.txt",
        "model.safetensors": folder / "model.safetensors",
    }

    problems: list[str] = []  # uncaught script errors and CSP violations, on every page
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    page.on(
        "console",
        lambda m: problems.append(m.text) if "Content Security Policy" in m.text else None,
    )
    sign_in(page, site, "alice")
    page.goto(f"{site}/ns/acme/-/new-model")
    page.get_by_label("Model name").fill("bert")
    page.get_by_role("button", name="Create model").click()
    page.wait_for_url(f"{site}/ns/acme/bert/upload")
    expect(page.get_by_text("You have no draft of bert")).to_be_visible()
    page.get_by_role("button", name="Create a draft version").click()
    page.wait_for_url(f"{site}/ns/acme/bert/v/1/upload")
    expect(page.get_by_text("No files in version 1 yet")).to_be_visible()
    assert page.locator("script:not([src])").count() == 0

    # A slow link: past part LET_THROUGH, part requests hang until the page goes away. And
    # a flaky server: the first try of part 2 gets a 503, which the page tries again.
    held = []
    refused = []

    def slow_link(route):
        number = int(PARTS_URL.search(route.request.url).group(2))
        if number > LET_THROUGH:
            held.append(route)
        elif number == 2 and not refused:
            refused.append(route.request.url)
            route.fulfill(
                status=503,
                headers={"Retry-After": "1"},
                json={"code": "database_unavailable", "message": "Try again.", "extra": {}},
            )
        else:
            route.continue_()

    page.route(PARTS_URL, slow_link)
    page.get_by_label("Choose a folder").set_input_files(folder)

    big_bar = page.locator('progress[data-path="model.safetensors"]')
    expect(page.locator('tr[data-path="tokenizer/vocab.txt"]')).to_be_visible()
    wait_for(
        page,
        lambda: UploadPart.objects.filter(session__path="model.safetensors").count() == LET_THROUGH,
        "the first parts of the big file",
    )
    wait_for(page, lambda: len(held) >= 1, "a held part")
    assert len(refused) == 1  # ...and part 2 is stored all the same (after its retry)
    # The page shows the big file part-way: more than nothing, less than all.
    page.wait_for_function(
        "b => Number(b.value) >= 6 * 2097152", arg=big_bar.element_handle(), timeout=10_000
    )
    assert 0 < float(big_bar.get_attribute("data-sent")) < BIG
    assert float(page.locator("#overall-progress").evaluate("b => b.value")) > 0

    page.reload()
    page.unroute(PARTS_URL)
    resume = page.locator("#resume")
    expect(resume).to_contain_text("Resume: choose the same files again.")
    expect(resume).to_contain_text("model.safetensors")

    sent_after_reload: dict[str, list[int]] = {}

    def record(request):
        match = PARTS_URL.search(request.url)
        if match and request.method == "PUT":
            sent_after_reload.setdefault(match.group(1), []).append(int(match.group(2)))

    page.on("request", record)
    page.get_by_label("Choose a folder").set_input_files(folder)
    expect(page.locator("#overall-text")).to_contain_text("3 of 3 files done", timeout=60_000)
    expect(page.locator('tr[data-path="model.safetensors"]')).to_contain_text(
        f"resumed: {LET_THROUGH} of 25 parts were already there"
    )
    expect(resume).to_be_hidden()
    # The files list follows the uploads without a reload.
    expect(page.get_by_text("3 files in version 1")).to_be_visible()

    # Only the missing parts of the big file were sent again: the server received its 50 MiB
    # once (every part stored exactly once, none replaced), through one session per file.
    big = UploadSession.objects.get(path="model.safetensors")
    assert sorted(sent_after_reload[str(big.id)]) == list(range(LET_THROUGH + 1, 26))
    parts = AuditEvent.objects.filter(action="upload.part", details__upload=str(big.id))
    assert sorted(e.details["part"] for e in parts) == list(range(1, 26))
    assert sum(e.details["size"] for e in parts) == BIG
    assert not any(e.details["replaced"] for e in parts)
    assert AuditEvent.objects.filter(action="upload.create").count() == 3

    files = {a.path: a for a in Artifact.objects.filter(version__model__name="bert")}
    assert set(files) == set(local)
    for path, file in local.items():
        assert files[path].size == file.stat().st_size, path
        assert files[path].sha256 == sha256_of(file), path

    page.get_by_role("button", name="Submit version 1 for scanning and review").click()
    status = page.locator("#scan-state")
    expect(status).to_contain_text("Scanning")
    # The scan runs on a real worker, started now that the page shows "scanning".
    scan_worker.start()
    expect(status).to_contain_text("Pending review", timeout=60_000)
    assert page.url == f"{site}/ns/acme/bert/v/1/upload"  # no navigation happened
    expect(page.locator("#uploader")).to_have_count(0)
    assert page.evaluate("() => localStorage.getItem('smr-uploads')") == "{}"
    assert problems == []


def test_dropped_files_upload_and_refusals_show_their_code(page, site, draft):
    sign_in(page, site, "alice")
    page.goto(f"{site}/ns/acme/bert/v/1/upload")
    expect(page.get_by_text("…or drop files or a folder here.")).to_be_visible()
    # A name ending in a dot is not a valid artifact path: the API says so.
    page.evaluate(
        """() => {
        const dt = new DataTransfer();
        dt.items.add(new File(['{"a": 1}'], "config.json", {type: "application/json"}));
        dt.items.add(new File(["x"], "notes."));
        document.getElementById("dropzone").dispatchEvent(
            new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
    }"""
    )
    expect(page.locator('tr[data-path="config.json"]')).to_contain_text("Uploaded")
    expect(page.locator('tr[data-path="notes."]')).to_contain_text("Failed")
    expect(page.locator("#upload-errors")).to_contain_text("(invalid_path)")
    expect(page.locator("#overall-text")).to_contain_text("1 of 2 files done")
    expect(page.get_by_text("1 file in version 1")).to_be_visible()
    assert [a.path for a in Artifact.objects.filter(version=draft)] == ["config.json"]
