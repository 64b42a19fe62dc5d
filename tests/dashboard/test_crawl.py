"""mallory (another team) replays every link alice can reach: each is a 404 or the login
page, and none shows a name of alice's namespace."""

from __future__ import annotations

from urllib.parse import urldefrag, urljoin, urlparse

import pytest

from registry.services import catalog, ledger, scanning
from registry.services.artifacts import artifact_upload
from tests.dashboard.conftest import sign_in

pytestmark = pytest.mark.django_db(transaction=True)

# Names that exist only in acme: none may appear on any page mallory gets.
SECRETS = ("acme", "bert", "census", "alice", "weights.safetensors")
MAX_PAGES = 250


def acme_world(actors) -> None:
    alice, root = actors.users["alice"], actors.users["root"]
    model = catalog.model_create(namespace=actors.acme, name="bert", creator=alice)
    catalog.model_update(model=model, description="# bert\nThe *census* model.", tags=None)
    version = catalog.version_create(model=model, creator=alice)
    artifact_upload(
        version=version,
        path="weights.safetensors",
        chunks=[b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "],
        expected_sha256=None,
        expected_size=None,
        creator=alice,
    )
    version, job = catalog.version_submit(version=version, submitter=alice)
    scanning.version_scan(job_id=job.pk)
    catalog.version_create(model=model, creator=alice)  # a draft too
    dataset = ledger.dataset_create(
        namespace=actors.acme, name="census", sensitivity="confidential", delta=1e-5, creator=root
    )
    ledger.data_block_create(dataset=dataset, name="b1", epsilon=5, accountant="rdp", creator=root)


def crawl(page, site: str) -> list[str]:
    """Every same-site link alice can reach from home (pages, downloads, API links)."""
    host = urlparse(site).netloc
    seen: list[str] = []
    queue = [f"{site}/"]
    while queue and len(seen) < MAX_PAGES:
        url = queue.pop(0)
        if url in seen:
            continue
        seen.append(url)
        if urlparse(url).path.startswith("/api/"):
            continue  # downloads and API links: replayed below, not rendered
        response = page.goto(url)
        if response is None or "text/html" not in response.headers.get("content-type", ""):
            continue
        for href in page.eval_on_selector_all("a[href]", "els => els.map(e => e.href)"):
            link = urldefrag(urljoin(url, href)).url
            parsed = urlparse(link)
            if parsed.netloc != host or parsed.path.startswith(("/logout", "/static/")):
                continue
            if link not in seen and link not in queue:
                queue.append(link)
    return seen


def test_mallory_replaying_alices_links_sees_nothing(browser, site, actors):
    acme_world(actors)
    alice = browser.new_context()
    page = alice.new_page()
    sign_in(page, site, "alice")
    links = crawl(page, site)
    alice.close()
    # A control: the crawl did reach acme's pages (the test would catch a leak).
    assert any("/bert" in link for link in links), links
    assert any("census" in link for link in links), links
    assert len(links) >= 8, links

    mallory = browser.new_context()
    page = mallory.new_page()
    sign_in(page, site, "mallory")
    leaks = []
    for link in links:
        if urlparse(link).path in ("/", "/login", "/reviews", "/settings", "/audit"):
            continue  # mallory's own versions of the shared pages: checked for names below
        response = page.request.get(link, max_redirects=0)
        status = response.status
        body = response.text()
        login = status in (301, 302) and "/login" in response.headers.get("location", "")
        if status != 404 and not login:
            leaks.append(f"{link}: {status}")
        # Echoing a name the URL itself carries tells mallory nothing she did not type.
        leaked = [n for n in SECRETS if n in body.lower() and n not in link.lower()]
        if leaked:
            leaks.append(f"{link}: shows {leaked}")
    for shared in ("/", "/reviews", "/settings", "/audit"):
        body = page.request.get(f"{site}{shared}").text().lower()
        leaked = [name for name in SECRETS if name in body]
        if leaked:
            leaks.append(f"{shared}: shows {leaked}")
    mallory.close()
    assert not leaks, "\n".join(leaks)
