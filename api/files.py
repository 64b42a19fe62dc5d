"""Artifact bytes over HTTP: raw streamed PUT, streamed GET/HEAD with Range, resumable uploads.

Bodies are read straight from the WSGI input and responses are generators, so memory use does
not depend on file size. DRF never parses these bodies.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterator
from urllib.parse import quote

from django.http import HttpResponse, HttpResponseBase, StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import status
from rest_framework.negotiation import BaseContentNegotiation
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from api import throttles
from api.pagination import cursor_by
from api.serializers import ArtifactOut, UploadIn, UploadOut
from api.views import ListView, parse, principal_of, user_of
from registry import selectors
from registry.access import Action
from registry.errors import (
    DigestMismatch,
    IncompleteBody,
    InvalidInput,
    LengthRequired,
    RangeNotSatisfiable,
    TooLarge,
    UnsupportedDigest,
)
from registry.models import Artifact
from registry.services import artifacts, uploads

# At most 18 digits a side: every real offset fits, and Python's int() never meets a
# thousands-of-digits string (ValueError past its conversion limit). Longer is "malformed",
# and a malformed Range is ignored (RFC 9110 14.2).
RANGE_RE = re.compile(r"^bytes=(\d{0,18})-(\d{0,18})$")
# One segment's worth per read: big enough to amortise per-call costs, small enough that
# gunicorn's body reader does not assemble (copy) large buffers.
READ_CHUNK = 1 << 20
DIGEST_ALGORITHMS = ("sha-256",)
CONTENT_LENGTH_RE = re.compile(r"^[0-9]+$")


class JSONErrorsOnly(BaseContentNegotiation):
    """File views answer bytes or JSON errors whatever the Accept header says."""

    def select_renderer(self, request, renderers, format_suffix=None):
        return JSONRenderer(), JSONRenderer.media_type

    def select_parser(self, request, parsers):
        return None


def content_length(request: Request) -> int:
    raw = request.META.get("CONTENT_LENGTH", "")
    if raw == "":
        if request.META.get("HTTP_TRANSFER_ENCODING"):
            raise LengthRequired("Chunked uploads are not supported; send Content-Length.")
        return 0  # RFC 9112 6.3: no Content-Length and no Transfer-Encoding means an empty body
    if not CONTENT_LENGTH_RE.match(raw):
        raise InvalidInput("Content-Length must be a non-negative integer.")
    if len(raw) > 18:  # beyond any size we accept; keeps int() away from huge digit strings
        raise TooLarge()
    return int(raw)


def body_chunks(request: Request, length: int) -> Iterator[bytes]:
    """Yield exactly `length` bytes of the raw request body, or raise IncompleteBody."""
    body = request.stream  # the WSGI input (DRF never parsed it); None for an empty body
    remaining = length
    while remaining > 0:
        try:
            chunk = body.read(min(READ_CHUNK, remaining)) if body is not None else b""
        except (OSError, ValueError) as exc:  # client went away mid-body
            raise IncompleteBody(received=length - remaining, expected=length) from exc
        if not chunk:
            raise IncompleteBody(received=length - remaining, expected=length)
        remaining -= len(chunk)
        yield chunk


def content_digest_sha256(request: Request) -> str | None:
    """The SHA-256 an RFC 9530 Content-Digest header claims, as hex, or None without one.

    Every member of an algorithm we check must be well formed and agree; unknown algorithms
    are ignored, but a header naming none we check is refused (400 with Want-Content-Digest),
    since silently storing bytes the client wanted verified would defeat its purpose.
    """
    header = request.META.get("HTTP_CONTENT_DIGEST")
    if header is None:
        return None
    claimed: set[str] = set()
    for member in header.split(","):
        name, _, value = member.strip().partition("=")
        if name.strip().lower() not in DIGEST_ALGORITHMS:
            continue
        value = value.strip()
        if not (len(value) >= 2 and value.startswith(":") and value.endswith(":")):
            raise InvalidInput("Content-Digest sha-256 must be a byte sequence: sha-256=:BASE64:")
        try:
            digest = base64.b64decode(value[1:-1], validate=True)
        except binascii.Error as exc:
            raise InvalidInput("Content-Digest sha-256 is not valid base64.") from exc
        if len(digest) != 32:
            raise InvalidInput("Content-Digest sha-256 must decode to 32 bytes.")
        claimed.add(digest.hex())
    if not claimed:
        raise UnsupportedDigest(supported=list(DIGEST_ALGORITHMS))
    if len(claimed) > 1:
        raise DigestMismatch(
            "Content-Digest holds two different sha-256 values; nothing was stored.",
            claimed=sorted(claimed),
        )
    return claimed.pop()


def digest_header(sha256_hex: str) -> str:
    return "sha-256=:" + base64.b64encode(bytes.fromhex(sha256_hex)).decode() + ":"


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end-exclusive) for a single byte range; None means send the whole file.

    Malformed or multi-range headers are ignored (RFC 9110 allows it); a well-formed range
    outside the file raises RangeNotSatisfiable.
    """
    if not header:
        return None
    match = RANGE_RE.match(header.strip())
    if not match:
        return None
    first, last = match.groups()
    if first == "" and last == "":
        return None
    if first == "":
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable(size=size)
        return max(0, size - suffix), size
    start = int(first)
    end = size if last == "" else min(int(last) + 1, size)
    if last != "" and int(last) < start:
        return None
    if start >= size:
        raise RangeNotSatisfiable(size=size)
    return start, end


def range_applies(request: Request, artifact: Artifact) -> bool:
    """RFC 9110 13.1.5: with If-Range, serve the range only if the file is still the one the
    client has (strong ETag match); otherwise the whole file, so a resumed download can never
    splice two different files. We send no Last-Modified, so a date never matches."""
    if_range = request.META.get("HTTP_IF_RANGE")
    return if_range is None or if_range.strip() == f'"{artifact.sha256}"'


def file_headers(response: HttpResponseBase, artifact: Artifact) -> None:
    response["Accept-Ranges"] = "bytes"
    response["ETag"] = f'"{artifact.sha256}"'
    response["Repr-Digest"] = digest_header(artifact.sha256)
    response["Content-Type"] = "application/octet-stream"
    response["Content-Disposition"] = content_disposition(artifact.path.rsplit("/", 1)[-1])
    response["Cache-Control"] = "private, no-store"


def content_disposition(filename: str) -> str:
    """`attachment` with an ASCII fallback name and, for other names, RFC 6266 filename*."""
    # No '%' in the fallback either: some clients percent-decode it (RFC 6266 appendix D).
    fallback = "".join(c if " " <= c < "\x7f" and c not in '"\\%' else "_" for c in filename)
    value = f'attachment; filename="{fallback}"'
    if fallback != filename:
        value += f"; filename*=UTF-8''{quote(filename, safe='')}"
    return value


class FileView(APIView):
    content_negotiation_class = JSONErrorsOnly
    throttle_classes = throttles.UPLOAD  # PUT only

    @extend_schema(
        request={"application/octet-stream": OpenApiTypes.BINARY},
        parameters=[
            OpenApiParameter("Content-Digest", str, OpenApiParameter.HEADER, required=False)
        ],
        responses={201: ArtifactOut},
        description="Upload a file as the raw request body (not multipart). Send Content-Length; "
        "optionally an RFC 9530 Content-Digest: sha-256=:BASE64: which is verified.",
    )
    def put(self, request: Request, ns: str, model: str, number: int, path: str) -> Response:
        version = selectors.version_get_for_user(
            principal=principal_of(request),
            namespace=ns,
            model=model,
            number=number,
            action=Action.WRITE,
        )
        length = content_length(request)
        artifact = artifacts.artifact_upload(
            version=version,
            path=path,
            chunks=body_chunks(request, length),
            expected_sha256=content_digest_sha256(request),
            expected_size=length,
            creator=user_of(request),
        )
        response = Response(ArtifactOut(artifact).data, status=status.HTTP_201_CREATED)
        response["ETag"] = f'"{artifact.sha256}"'
        return response

    def _artifact(self, request: Request, ns: str, model: str, number: int, path: str) -> Artifact:
        return selectors.artifact_get_for_user(
            principal=principal_of(request),
            namespace=ns,
            model=model,
            number=number,
            path=path,
            action=Action.DOWNLOAD,
        )

    @extend_schema(
        responses={
            (200, "application/octet-stream"): OpenApiTypes.BINARY,
            206: OpenApiTypes.BINARY,
        },
        parameters=[
            OpenApiParameter("Range", str, OpenApiParameter.HEADER, required=False),
            OpenApiParameter("If-Range", str, OpenApiParameter.HEADER, required=False),
        ],
        description="Stream the decrypted file. Supports a single `Range: bytes=...` (with "
        "`If-Range`: the ETag); every byte sent has been authenticated.",
    )
    def get(
        self, request: Request, ns: str, model: str, number: int, path: str
    ) -> HttpResponseBase:
        artifact = self._artifact(request, ns, model, number, path)
        if request.META.get("HTTP_IF_NONE_MATCH", "").strip() == f'"{artifact.sha256}"':
            not_modified = HttpResponse(status=304)
            file_headers(not_modified, artifact)
            return not_modified
        byte_range = (
            parse_range(request.META.get("HTTP_RANGE"), artifact.size)
            if range_applies(request, artifact)
            else None
        )
        start, end = byte_range or (0, artifact.size)
        body = artifacts.artifact_open(
            artifact=artifact, start=start, end=end, ranged=byte_range is not None
        )
        # Pull the first authenticated segment before sending headers, so a missing key,
        # an unreachable store or a corrupt first segment is a clean error response. After
        # that, a failure can only cut the connection: the client sees a short body, never
        # unauthenticated bytes. Django closes `body` when the response ends.
        body.prefetch()
        response = StreamingHttpResponse(body, status=206 if byte_range else 200)
        file_headers(response, artifact)
        response["Content-Length"] = str(end - start)
        if byte_range:
            response["Content-Range"] = f"bytes {start}-{end - 1}/{artifact.size}"
        else:
            response["Content-Digest"] = digest_header(artifact.sha256)
        return response

    def head(self, request: Request, ns: str, model: str, number: int, path: str):
        artifact = self._artifact(request, ns, model, number, path)
        response = HttpResponse(status=200)
        file_headers(response, artifact)
        response["Content-Length"] = str(artifact.size)
        response["Content-Digest"] = digest_header(artifact.sha256)
        return response

    @extend_schema(responses={204: None})
    def delete(self, request: Request, ns: str, model: str, number: int, path: str) -> Response:
        artifact = selectors.artifact_get_for_user(
            principal=principal_of(request),
            namespace=ns,
            model=model,
            number=number,
            path=path,
            action=Action.WRITE,
        )
        artifacts.artifact_delete(artifact=artifact)
        return Response(status=status.HTTP_204_NO_CONTENT)


class FileListView(ListView):
    pagination_class = cursor_by("path")

    @extend_schema(responses=ArtifactOut(many=True))
    def get(self, request: Request, ns: str, model: str, number: int) -> Response:
        files = selectors.artifact_list_for_user(
            principal=principal_of(request), namespace=ns, model=model, number=number
        )
        return self.page(request, files, ArtifactOut)


def _session(request: Request, ns: str, model: str, number: int, upload_id: str):
    return selectors.upload_session_get_for_user(
        principal=principal_of(request),
        namespace=ns,
        model=model,
        number=number,
        upload_id=upload_id,
        action=Action.WRITE,
    )


class UploadCreateView(APIView):
    throttle_classes = throttles.UPLOAD

    @extend_schema(request=UploadIn, responses={201: UploadOut})
    def post(self, request: Request, ns: str, model: str, number: int) -> Response:
        version = selectors.version_get_for_user(
            principal=principal_of(request),
            namespace=ns,
            model=model,
            number=number,
            action=Action.WRITE,
        )
        data = parse(UploadIn, request)
        session = uploads.upload_session_create(
            version=version,
            path=data["path"],
            size=data["size"],
            sha256=data.get("sha256"),
            part_size=data.get("part_size"),
            creator=user_of(request),
        )
        return Response(UploadOut(session).data, status=status.HTTP_201_CREATED)


class UploadDetailView(APIView):
    @extend_schema(responses=UploadOut)
    def get(self, request: Request, ns: str, model: str, number: int, upload_id: str) -> Response:
        return Response(UploadOut(_session(request, ns, model, number, upload_id)).data)

    @extend_schema(responses=UploadOut)
    def delete(
        self, request: Request, ns: str, model: str, number: int, upload_id: str
    ) -> Response:
        session = uploads.upload_session_abort(
            session=_session(request, ns, model, number, upload_id)
        )
        return Response(UploadOut(session).data)


class UploadPartView(APIView):
    content_negotiation_class = JSONErrorsOnly
    throttle_classes = throttles.UPLOAD

    @extend_schema(request={"application/octet-stream": OpenApiTypes.BINARY}, responses=UploadOut)
    def put(
        self, request: Request, ns: str, model: str, number: int, upload_id: str, part: int
    ) -> Response:
        session = _session(request, ns, model, number, upload_id)
        length = content_length(request)
        uploads.upload_part_put(
            session=session, number=part, chunks=body_chunks(request, length), length=length
        )
        return Response(UploadOut(session).data)


class UploadCompleteView(APIView):
    throttle_classes = throttles.UPLOAD

    @extend_schema(request=None, responses={201: ArtifactOut})
    def post(self, request: Request, ns: str, model: str, number: int, upload_id: str) -> Response:
        artifact = uploads.upload_session_complete(
            session=_session(request, ns, model, number, upload_id), creator=user_of(request)
        )
        return Response(ArtifactOut(artifact).data, status=status.HTTP_201_CREATED)
