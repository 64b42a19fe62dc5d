"""Registry signing keys (ECDSA P-256) for OMS bundles, and the audit action for creating one."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("registry", "0013_webhook_secret_wrapped"),
    ]

    operations = [
        migrations.CreateModel(
            name="SigningKey",
            fields=[
                ("key_id", models.CharField(max_length=64, primary_key=True, serialize=False)),
                ("algorithm", models.CharField(default="ecdsa-p256-sha256", max_length=32)),
                ("public_key_pem", models.TextField()),
                (
                    "provider",
                    models.CharField(choices=[("local", "Local"), ("kms", "Kms")], max_length=8),
                ),
                ("private_key_wrapped", models.BinaryField(blank=True, default=b"")),
                ("private_key_kek_id", models.CharField(blank=True, default="", max_length=512)),
                ("kms_key_id", models.CharField(blank=True, default="", max_length=2048)),
                ("created_at", models.DateTimeField(auto_now_add=True)),
                ("retired_at", models.DateTimeField(blank=True, null=True)),
            ],
            options={
                "constraints": [
                    models.UniqueConstraint(
                        models.Value(True),
                        condition=models.Q(("retired_at__isnull", True)),
                        name="signing_key_one_current",
                    ),
                    models.CheckConstraint(
                        condition=models.Q(
                            models.Q(
                                ("kms_key_id", ""),
                                ("provider", "local"),
                                models.Q(("private_key_kek_id", ""), _negated=True),
                            ),
                            models.Q(
                                ("private_key_kek_id", ""),
                                ("private_key_wrapped", b""),
                                ("provider", "kms"),
                                models.Q(("kms_key_id", ""), _negated=True),
                            ),
                            _connector="OR",
                        ),
                        name="signing_key_material",
                    ),
                ],
            },
        ),
        migrations.AlterField(
            model_name="auditevent",
            name="action",
            field=models.CharField(
                choices=[
                    ("auth.failed", "Auth Failed"),
                    ("auth.login_failed", "Login Failed"),
                    ("auth.login", "Login"),
                    ("auth.logout", "Logout"),
                    ("auth.locked_out", "Locked Out"),
                    ("token.create", "Token Create"),
                    ("token.revoke", "Token Revoke"),
                    ("namespace.create", "Namespace Create"),
                    ("namespace.update", "Namespace Update"),
                    ("member.set", "Member Set"),
                    ("member.remove", "Member Remove"),
                    ("model.create", "Model Create"),
                    ("model.update", "Model Update"),
                    ("model.delete", "Model Delete"),
                    ("version.create", "Version Create"),
                    ("version.submit", "Version Submit"),
                    ("version.scan", "Version Scan"),
                    ("version.rescan", "Version Rescan"),
                    ("version.approve", "Version Approve"),
                    ("version.reject", "Version Reject"),
                    ("version.deprecate", "Version Deprecate"),
                    ("version.revoke", "Version Revoke"),
                    ("review.record", "Review Record"),
                    ("policy.update", "Policy Update"),
                    ("version.update", "Version Update"),
                    ("alias.set", "Alias Set"),
                    ("alias.delete", "Alias Delete"),
                    ("job.create", "Job Create"),
                    ("job.fail", "Job Fail"),
                    ("artifact.upload", "Artifact Upload"),
                    ("artifact.download", "Artifact Download"),
                    ("artifact.download_incomplete", "Artifact Download Incomplete"),
                    ("artifact.delete", "Artifact Delete"),
                    ("artifact.integrity_failure", "Artifact Integrity Failure"),
                    ("upload.create", "Upload Create"),
                    ("upload.part", "Upload Part"),
                    ("upload.complete", "Upload Complete"),
                    ("upload.abort", "Upload Abort"),
                    ("key.rewrap", "Key Rewrap"),
                    ("access.denied", "Access Denied"),
                    ("audit.checkpoint", "Audit Checkpoint"),
                    ("audit.verify", "Audit Verify"),
                    ("audit.export", "Audit Export"),
                    ("webhook.create", "Webhook Create"),
                    ("webhook.delete", "Webhook Delete"),
                    ("signing_key.create", "Signing Key Create"),
                ],
                db_index=True,
                max_length=40,
            ),
        ),
    ]
