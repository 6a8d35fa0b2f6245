"""Results, feedback and users.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("role", sa.String(8), nullable=False),
        sa.Column("password_hash", sa.String(256), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("disabled", sa.Boolean, nullable=False),
    )
    op.create_table(
        "results",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=False, index=True),
        sa.Column("series_instance_uid", sa.String(64), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False, index=True),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("review_key", sa.String(16), nullable=False, index=True),
        sa.Column("accession_number", sa.String(64), nullable=False, index=True),
        sa.Column("patient_id", sa.String(64), nullable=False, index=True),
        sa.Column("patient_name", sa.String(324), nullable=False),
        sa.Column("study_date", sa.Date, nullable=True),
        sa.Column("received_at", sa.DateTime, nullable=True),
        sa.Column("answered_at", sa.DateTime, nullable=False, index=True),
        sa.Column("probability", sa.Float, nullable=False),
        sa.Column("decision", sa.String(16), nullable=False, index=True),
        sa.Column("threshold", sa.Float, nullable=False),
        sa.Column("ood_gate", sa.String(128), nullable=True),
        sa.Column("ood_score", sa.Float, nullable=True),
        sa.Column("faithfulness", sa.Float, nullable=True),
        sa.Column("model_name", sa.String(64), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False, index=True),
        sa.Column("heatmap_scale", sa.Float, nullable=True),
        sa.Column("decode_ms", sa.Float, nullable=True),
        sa.Column("infer_ms", sa.Float, nullable=True),
        sa.Column("build_ms", sa.Float, nullable=True),
        sa.Column("sc_sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("sr_sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("preview_path", sa.String(512), nullable=False),
        sa.Column("grid_path", sa.String(512), nullable=False),
        sa.UniqueConstraint("sop_instance_uid", "model_version", name="uq_results_instance_model"),
    )
    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("result_id", sa.Integer, sa.ForeignKey("results.id", ondelete="CASCADE"), nullable=False,
                  index=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False, index=True),
        sa.Column("agree", sa.Boolean, nullable=False),
        sa.Column("label", sa.String(16), nullable=False),
        sa.Column("comment", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("feedback")
    op.drop_table("results")
    op.drop_table("users")
