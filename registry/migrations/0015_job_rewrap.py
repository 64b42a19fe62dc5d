"""KEK rotation as a job: the `rewrap` kind, system-wide jobs (no namespace), job params."""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("registry", "0014_signing_keys"),
    ]

    operations = [
        migrations.RemoveConstraint(
            model_name="job",
            name="job_kind",
        ),
        migrations.AddField(
            model_name="job",
            name="params",
            field=models.JSONField(blank=True, default=dict),
        ),
        migrations.AlterField(
            model_name="job",
            name="kind",
            field=models.CharField(choices=[("scan", "Scan"), ("rewrap", "Rewrap")], max_length=16),
        ),
        migrations.AlterField(
            model_name="job",
            name="namespace",
            field=models.ForeignKey(
                blank=True,
                null=True,
                on_delete=django.db.models.deletion.CASCADE,
                related_name="jobs",
                to="registry.namespace",
            ),
        ),
        migrations.AddConstraint(
            model_name="job",
            constraint=models.CheckConstraint(
                condition=models.Q(("kind__in", ["scan", "rewrap"])), name="job_kind"
            ),
        ),
    ]
