"""Settings of the TFX pipeline (the TFX template's configs module): edit here, not in the runners."""

import os

PIPELINE_NAME = "tfx-xmatch"
# Root of the pipeline's artifacts and metadata; a GCS path for Kubeflow / Vertex.
OUTPUT_DIR = os.environ.get("XMATCH_TFX_OUTPUT", os.path.join(os.getcwd(), "tfx_output"))
PIPELINE_ROOT = os.path.join(OUTPUT_DIR, "tfx_pipeline_output", PIPELINE_NAME)
METADATA_PATH = os.path.join(OUTPUT_DIR, "tfx_metadata", PIPELINE_NAME, "metadata.db")
# Output of the prepare step: train-*.tfrecord, validation-*.tfrecord, item_vocab.json.
DATA_ROOT = os.environ.get("XMATCH_TFX_DATA", os.path.join(os.getcwd(), "prepared"))
# The MODEL_BASE_PATH a TF Serving (or `xmatch serve`) instance watches.
SERVING_MODEL_DIR = os.path.join(OUTPUT_DIR, "serving_model", PIPELINE_NAME)
MODULE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "trainer_module.py")

TRAIN_NUM_STEPS = 2000
EVAL_NUM_STEPS = 0  # run_fn evaluates every eval example with full ranking
# run_fn's custom_config (see trainer_module.py); item_vocab is filled from DATA_ROOT.
RUN_CONFIG = {"model": {"name": "two_tower", "user_tower": "sasrec", "max_length": 200}, "train": {"epochs": 20}}
EXPORT = {"index_kind": "brute_force", "k_max": 100}
BEAM_PIPELINE_ARGS = ["--direct_running_mode=multi_processing", "--direct_num_workers=0"]
# Kubeflow / Vertex: the image holding tfx, tfx_xmatch and this directory.
PIPELINE_IMAGE = os.environ.get("XMATCH_TFX_IMAGE", "gcr.io/YOUR-PROJECT/tfx-xmatch:latest")
# Start each training from the latest model this pipeline trained (the Trainer's base_model);
# the first run trains from scratch.
WARM_START_FROM_LATEST_MODEL = False
