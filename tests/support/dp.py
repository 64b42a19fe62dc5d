"""A registered DP dataset for tests: scikit-learn's bundled digits (no download), uploaded as
an .npz file of a submitted version and registered as one block of a confidential dataset."""

from __future__ import annotations

import io

import numpy as np

from registry.models import Dataset, VersionState
from registry.services import catalog, ledger, scanning
from registry.services.artifacts import artifact_upload

DATA_MODEL = "digits-data"
DATA_PATH = "digits.npz"


def digits_npz() -> bytes:
    from sklearn.datasets import load_digits

    digits = load_digits()
    buffer = io.BytesIO()
    np.savez(buffer, X=digits.data.astype(np.float32), y=digits.target.astype(np.int64))
    return buffer.getvalue()


def digits_dataset(
    actors, *, epsilon: float = 10.0, accountant: str = "rdp", name: str = "digits"
) -> Dataset:
    """acme/datasets/<name> with block `b1` over the 1,797 digits (admin root registers it)."""
    root = actors.users["root"]
    model = catalog.model_create(namespace=actors.acme, name=f"{name}-data", creator=root)
    version = catalog.version_create(model=model, creator=root)
    artifact = artifact_upload(
        version=version,
        path=DATA_PATH,
        chunks=iter([digits_npz()]),
        expected_sha256=None,
        expected_size=None,
        creator=root,
    )
    version, job = catalog.version_submit(version=version, submitter=root)
    assert scanning.version_scan(job_id=job.pk) == VersionState.PENDING_REVIEW
    artifact.version.refresh_from_db()
    dataset = ledger.dataset_create(
        namespace=actors.acme, name=name, sensitivity="confidential", delta=1e-5, creator=root
    )
    ledger.data_block_create(
        dataset=dataset,
        name="b1",
        epsilon=epsilon,
        accountant=accountant,
        artifact=artifact,
        records=1797,
        creator=root,
    )
    return dataset
