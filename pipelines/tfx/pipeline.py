"""The TFX pipeline: ImportExampleGen (prepared TFRecords) -> Trainer (tfx_xmatch run_fn) -> Pusher,
optionally with the latest trained model resolved as the Trainer's ``base_model`` (warm start).

``create_pipeline`` is pure: it only builds the pipeline object, so runners (local, Kubeflow) and
tests share it. ``tfx`` is imported inside it because the package is optional (see DESIGN.md).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence


def create_pipeline(
    pipeline_name: str,
    pipeline_root: str,
    data_root: str,
    module_file: str,
    serving_model_dir: str,
    run_config: dict,
    export: Optional[dict] = None,
    train_steps: Optional[int] = None,
    eval_steps: Optional[int] = None,
    metadata_connection_config=None,
    beam_pipeline_args: Sequence[str] = (),
    warm_start_from_latest_model: bool = False,
):
    """Builds the ExampleGen -> Trainer -> Pusher pipeline.

    Args:
      pipeline_name: Name of the pipeline.
      pipeline_root: Directory (or GCS path) of its artifacts.
      data_root: Output of the prepare step: ``train-*.tfrecord``, ``validation-*.tfrecord``
        and ``item_vocab.json``.
      module_file: Path of ``trainer_module.py``.
      serving_model_dir: Base directory the Pusher versions SavedModels into.
      run_config: A tfx_xmatch RunConfig as nested dicts (model, train, eval sections).
      export: Export settings of run_fn (index_kind, index_options, k_max).
      train_steps, eval_steps: The Trainer's step arguments.
      metadata_connection_config: ML Metadata connection (local runs: sqlite).
      beam_pipeline_args: Beam options of the Beam-based components.
      warm_start_from_latest_model: Start training from the weights of this pipeline's latest
        trained model (a ``Resolver`` with ``LatestArtifactStrategy`` feeding the Trainer's
        ``base_model``); the first run, with no model yet, trains from scratch. Not checked here
        (tfx is not installable with this stack): compiled for Vertex AI, the resolver may query
        every Model artifact of the project's metadata, not only this pipeline's; a model that
        does not fit (another kind or architecture, or no item id in common) is then refused by run_fn,
        not used. Default False.

    Returns:
      A ``tfx.dsl.Pipeline``.

    Raises:
      ImportError: ``tfx`` is not installed.
    """
    from tfx import v1 as tfx

    example_gen = tfx.components.ImportExampleGen(
        input_base=data_root,
        input_config=tfx.proto.Input(splits=[
            tfx.proto.Input.Split(name="train", pattern="train-*.tfrecord"),
            tfx.proto.Input.Split(name="eval", pattern="validation-*.tfrecord"),
        ]),
    )
    components = [example_gen]
    base_model = None
    if warm_start_from_latest_model:
        latest_model = tfx.dsl.Resolver(
            strategy_class=tfx.dsl.experimental.LatestArtifactStrategy,
            model=tfx.dsl.Channel(type=tfx.types.standard_artifacts.Model),
        ).with_id("latest_model_resolver")
        components.append(latest_model)
        base_model = latest_model.outputs["model"]
    trainer = tfx.components.Trainer(
        module_file=module_file,
        examples=example_gen.outputs["examples"],
        base_model=base_model,
        train_args=tfx.proto.TrainArgs(num_steps=train_steps),
        eval_args=tfx.proto.EvalArgs(num_steps=eval_steps),
        custom_config={"config": run_config, "item_vocab": os.path.join(data_root, "item_vocab.json"),
                       "export": dict(export or {})},
    )
    pusher = tfx.components.Pusher(
        model=trainer.outputs["model"],
        push_destination=tfx.proto.PushDestination(
            filesystem=tfx.proto.PushDestination.Filesystem(base_directory=serving_model_dir)),
    )
    return tfx.dsl.Pipeline(
        pipeline_name=pipeline_name,
        pipeline_root=pipeline_root,
        components=[*components, trainer, pusher],
        metadata_connection_config=metadata_connection_config,
        beam_pipeline_args=list(beam_pipeline_args),
    )
