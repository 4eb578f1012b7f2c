"""Runs the TFX pipeline on this machine: python pipelines/tfx/local_runner.py"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import configs  # noqa: E402
from pipeline import create_pipeline  # noqa: E402


def main() -> None:
    from tfx import v1 as tfx

    tfx.orchestration.LocalDagRunner().run(create_pipeline(
        pipeline_name=configs.PIPELINE_NAME,
        pipeline_root=configs.PIPELINE_ROOT,
        data_root=configs.DATA_ROOT,
        module_file=configs.MODULE_FILE,
        serving_model_dir=configs.SERVING_MODEL_DIR,
        run_config=configs.RUN_CONFIG,
        export=configs.EXPORT,
        train_steps=configs.TRAIN_NUM_STEPS,
        eval_steps=configs.EVAL_NUM_STEPS,
        metadata_connection_config=tfx.orchestration.metadata.sqlite_metadata_connection_config(configs.METADATA_PATH),
        beam_pipeline_args=configs.BEAM_PIPELINE_ARGS,
        warm_start_from_latest_model=configs.WARM_START_FROM_LATEST_MODEL,
    ))


if __name__ == "__main__":
    main()
