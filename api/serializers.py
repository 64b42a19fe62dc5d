"""Input and output shapes, one pair per view where they differ. No business logic here."""

from __future__ import annotations

from rest_framework import serializers

from registry.models import Role, TokenScope


class NamespaceIn(serializers.Serializer):
    name = serializers.CharField(max_length=63)
    description = serializers.CharField(required=False, allow_blank=True, default="")


class NamespacePatch(serializers.Serializer):
    description = serializers.CharField(required=False, allow_blank=True)


class NamespaceOut(serializers.Serializer):
    name = serializers.CharField()
    description = serializers.CharField()
    created_at = serializers.DateTimeField()


class MemberIn(serializers.Serializer):
    username = serializers.CharField(max_length=150)
    role = serializers.ChoiceField(choices=Role.choices)


class MemberOut(serializers.Serializer):
    username = serializers.CharField(source="user.username")
    role = serializers.CharField()
    created_at = serializers.DateTimeField()


class ModelIn(serializers.Serializer):
    name = serializers.CharField(max_length=128)
    description = serializers.CharField(required=False, allow_blank=True, default="")


class ModelPatch(serializers.Serializer):
    description = serializers.CharField(required=False, allow_blank=True)


class ModelOut(serializers.Serializer):
    namespace = serializers.CharField(source="namespace.name")
    name = serializers.CharField()
    description = serializers.CharField()
    created_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField()


class VersionIn(serializers.Serializer):
    description = serializers.CharField(required=False, allow_blank=True, default="")


class ArtifactOut(serializers.Serializer):
    path = serializers.CharField()
    size = serializers.IntegerField()
    sha256 = serializers.CharField()
    kek_id = serializers.CharField()
    created_at = serializers.DateTimeField()


class VersionOut(serializers.Serializer):
    namespace = serializers.CharField(source="model.namespace.name")
    model = serializers.CharField(source="model.name")
    number = serializers.IntegerField()
    state = serializers.CharField()
    description = serializers.CharField()
    created_by = serializers.CharField(source="created_by.username", default=None)
    created_at = serializers.DateTimeField()
    submitted_at = serializers.DateTimeField(allow_null=True)


class VersionDetailOut(VersionOut):
    files = ArtifactOut(many=True, source="artifacts.all")
    total_size = serializers.SerializerMethodField()

    def get_total_size(self, obj) -> int:
        return sum(a.size for a in obj.artifacts.all())


class UploadIn(serializers.Serializer):
    path = serializers.CharField(max_length=4096)
    size = serializers.IntegerField(min_value=0)
    sha256 = serializers.RegexField(r"^[0-9a-f]{64}$", required=False)
    part_size = serializers.IntegerField(required=False, min_value=1)


class UploadPartOut(serializers.Serializer):
    number = serializers.IntegerField()
    size = serializers.IntegerField()
    sha256 = serializers.CharField()


class UploadOut(serializers.Serializer):
    id = serializers.UUIDField()
    path = serializers.CharField()
    size = serializers.IntegerField()
    sha256 = serializers.CharField()
    part_size = serializers.IntegerField()
    part_count = serializers.IntegerField()
    state = serializers.CharField()
    expires_at = serializers.DateTimeField()
    parts = UploadPartOut(many=True, source="parts.all")
    missing_parts = serializers.SerializerMethodField()

    def get_missing_parts(self, obj) -> list[int]:
        have = {p.number for p in obj.parts.all()}
        return [n for n in range(1, obj.part_count + 1) if n not in have]


class TokenIn(serializers.Serializer):
    name = serializers.CharField(max_length=100, required=False, allow_blank=True, default="")
    scopes = serializers.ListField(child=serializers.ChoiceField(choices=TokenScope.choices))
    expires_at = serializers.DateTimeField(required=False, allow_null=True)


class TokenOut(serializers.Serializer):
    id = serializers.CharField(source="key_id")
    name = serializers.CharField()
    scopes = serializers.ListField(child=serializers.CharField())
    created_at = serializers.DateTimeField()
    expires_at = serializers.DateTimeField(allow_null=True)
    last_used_at = serializers.DateTimeField(allow_null=True)
    revoked_at = serializers.DateTimeField(allow_null=True)


class TokenCreatedOut(TokenOut):
    token = serializers.CharField(help_text="Shown once; store it now.")
