"""Secure Model Registry client: the `smr` command and the SDK (`from smr import Registry`).

No Django here: the client talks to the registry's REST API only.
"""

from smr.errors import SmrError, VerificationError
from smr.sdk import Registry

__all__ = ["Registry", "SmrError", "VerificationError"]
__version__ = "0.1.0"
