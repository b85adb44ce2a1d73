"""typer options several commands share, so each flag has one spelling and one help text."""

from __future__ import annotations

from typing import Any

import typer

JSON_OPTION = typer.Option(False, "--json", help="Write machine-readable JSON (NDJSON) to stdout.")


FORCE_OPTION = typer.Option(
    False, "--force", "-f", help="Redo the work even if an identical output exists."
)


DRY_RUN_OPTION = typer.Option(False, "--dry-run", help="Print the planned output path and exit.")


# calibration options every calibrated method shares (quantize's and prune's)
CALIB_OPTION = typer.Option(
    None,
    "--calib",
    help="Calibration text [default: $CLLM_DATA_DIR/calibration/wikitext-2-valid.tokens].",
)


CALIB_SAMPLES_OPTION = typer.Option(128, "--calib-samples", help="Calibration sequences.")


CALIB_SEQLEN_OPTION = typer.Option(512, "--calib-seqlen", help="Tokens per calibration sequence.")


SEED_OPTION = typer.Option(0, "--seed", help="Seed for choosing calibration windows.")


CALIB_DTYPE_OPTION = typer.Option(
    "auto",
    "--calib-dtype",
    help="Calibration forward passes in auto (bf16 where the CPU has it), fp32 or bf16.",
)


SENSITIVITY_CHUNKS_OPTION = typer.Option(
    2, "--sensitivity-chunks", help="512-token chunks of calibration text per measurement."
)


def output_option(default_name: str) -> Any:
    return typer.Option(
        None, "--output", "-o", help=f"Output path [default: {default_name} beside the input]."
    )
