"""A model server speaking TensorFlow Serving's protocol, for one machine and for tests.

Real deployments run ``tensorflow/serving`` (see ``serving/deploy/``). This package serves the
same SavedModels over the same wire protocol, so that clients written for TF Serving (the
``tensorflow-serving-api`` stubs, or plain HTTP against ``/v1/models/...``) work unchanged:

- gRPC ``tensorflow.serving.PredictionService`` (``Predict``, ``GetModelMetadata``) and
  ``tensorflow.serving.ModelService`` (``GetModelStatus``, ``HandleReloadConfigRequest``);
- REST ``/v1/models/NAME[/versions/N|/labels/L][:predict|/metadata]``.

Modules:

- :mod:`serving.model_manager`: version discovery under ``MODEL_BASE_PATH/<version>/``, loading
  in the background, atomic swap, reference-counted unloading, ``models.config`` parsing.
- :mod:`serving.batching`: merges concurrent requests to the same signature into one call.
- :mod:`serving.inference`: the request path shared by both front-ends (validation, batching,
  TF error mapping).
- :mod:`serving.codec`: TensorProto and TF Serving JSON <-> NumPy conversions.
- :mod:`serving.grpc_service`, :mod:`serving.rest_service`: the two front-ends.
- :mod:`serving.server`: :class:`~serving.server.ModelServer` and the CLI (``main(argv)``).
- :mod:`serving.client`: a small client over the TF Serving stubs (``main(argv)``).

Importing this package does not import TensorFlow; the submodules do.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
