"""Tink, the independent oracle for our streaming format: a StreamingAead over a raw DEK."""

from __future__ import annotations

import io

import tink
from tink import secret_key_access, streaming_aead
from tink.proto import aes_gcm_hkdf_streaming_pb2, common_pb2, tink_pb2

from registry.crypto.stream import SEGMENT_SIZE


def tink_streaming_aead(dek: bytes) -> streaming_aead.StreamingAead:
    """AES256_GCM_HKDF_1MB with key_value = dek, exactly the parameters the registry uses."""
    streaming_aead.register()
    key = aes_gcm_hkdf_streaming_pb2.AesGcmHkdfStreamingKey(
        version=0,
        key_value=dek,
        params=aes_gcm_hkdf_streaming_pb2.AesGcmHkdfStreamingParams(
            ciphertext_segment_size=SEGMENT_SIZE,
            derived_key_size=32,
            hkdf_hash_type=common_pb2.SHA256,
        ),
    )
    keyset = tink_pb2.Keyset(
        primary_key_id=1,
        key=[
            tink_pb2.Keyset.Key(
                key_data=tink_pb2.KeyData(
                    type_url="type.googleapis.com/google.crypto.tink.AesGcmHkdfStreamingKey",
                    value=key.SerializeToString(),
                    key_material_type=tink_pb2.KeyData.SYMMETRIC,
                ),
                status=tink_pb2.ENABLED,
                key_id=1,
                # Streaming AEAD has no per-ciphertext key prefix; Tink requires RAW.
                output_prefix_type=tink_pb2.RAW,
            )
        ],
    )
    handle = tink.proto_keyset_format.parse(keyset.SerializeToString(), secret_key_access.TOKEN)
    return handle.primitive(streaming_aead.StreamingAead)


class _Captured(io.BytesIO):
    """Tink closes its destination when the encrypting stream closes; keep the bytes."""

    value = b""

    def close(self) -> None:
        self.value = self.getvalue()
        super().close()


def tink_encrypt(primitive: streaming_aead.StreamingAead, data: bytes, ad: bytes) -> bytes:
    sink = _Captured()
    with primitive.new_encrypting_stream(sink, ad) as enc:
        enc.write(data)
    return sink.value


def tink_decrypt(primitive: streaming_aead.StreamingAead, ct: bytes, ad: bytes) -> bytes:
    with primitive.new_decrypting_stream(io.BytesIO(ct), ad) as dec:
        return dec.read()
