"""Compiles the TFX pipeline for Kubeflow Pipelines v2 / Vertex AI Pipelines:
python pipelines/tfx/kubeflow_runner.py  (writes tfx-xmatch_pipeline.json)"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import configs  # noqa: E402
from pipeline import create_pipeline  # noqa: E402


def main() -> None:
    from tfx import v1 as tfx

    runner = tfx.orchestration.experimental.KubeflowV2DagRunner(
        config=tfx.orchestration.experimental.KubeflowV2DagRunnerConfig(default_image=configs.PIPELINE_IMAGE),
        output_filename=f"{configs.PIPELINE_NAME}_pipeline.json",
    )
    runner.run(create_pipeline(
        pipeline_name=configs.PIPELINE_NAME,
        pipeline_root=configs.PIPELINE_ROOT,
        data_root=configs.DATA_ROOT,
        # TFX packages the module's directory as a wheel under pipeline_root at compile time;
        # the image needs tfx_xmatch installed, not this file (see pipelines/README.md).
        module_file=configs.MODULE_FILE,
        serving_model_dir=configs.SERVING_MODEL_DIR,
        run_config=configs.RUN_CONFIG,
        export=configs.EXPORT,
        train_steps=configs.TRAIN_NUM_STEPS,
        eval_steps=configs.EVAL_NUM_STEPS,
        beam_pipeline_args=configs.BEAM_PIPELINE_ARGS,
        warm_start_from_latest_model=configs.WARM_START_FROM_LATEST_MODEL,
    ))


if __name__ == "__main__":
    main()
