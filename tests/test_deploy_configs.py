"""The shipped TF Serving deployment files parse with TF Serving's own protos and agree."""

import pathlib

import yaml
from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2
import re

DEPLOY = pathlib.Path(__file__).resolve().parents[1] / "serving" / "deploy"


def _model_config(text):
    return text_format.Parse(text, model_server_config_pb2.ModelServerConfig())


# Fields of tensorflow.serving.BatchingParameters (its proto is not in tensorflow-serving-api).
BATCHING_FIELDS = {"max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads",
                   "thread_pool_name", "allowed_batch_sizes", "pad_variable_length_inputs",
                   "enable_large_batch_splitting"}


def _batching(text):
    """{field: value} of a BatchingParameters text proto; unknown fields or syntax fail."""
    fields = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"(\w+)\s*\{\s*value:\s*(\d+)\s*\}|(\w+):\s*(true|false|\d+)", line)
        assert match, f"not a BatchingParameters line: {line!r}"
        name, value = (match[1], int(match[2])) if match[1] else (match[3], match[4])
        assert name in BATCHING_FIELDS, f"unknown batching field {name!r}"
        fields[name] = value
    return fields


def test_model_configs_parse_and_point_under_models():
    for name in ("models.config", "models.scann.config"):
        config = _model_config((DEPLOY / name).read_text())
        for model in config.model_config_list.config:
            assert model.model_platform == "tensorflow" and model.base_path.startswith("/models/")


def test_batching_parameters_parse():
    batching = _batching((DEPLOY / "batching_parameters.txt").read_text())
    assert batching["max_batch_size"] > 0 and batching["batch_timeout_micros"] > 0


def test_compose_pins_the_serving_images_and_mounts_the_configs():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert services["cpu"]["image"] == "tensorflow/serving:2.20.0"
    assert services["gpu"]["image"] == "tensorflow/serving:2.20.0-gpu"
    for service in services.values():
        mounted = {volume.split(":")[0] for volume in service["volumes"]}
        assert "./batching_parameters.txt" in mounted
        assert (DEPLOY / next(m for m in mounted if m.endswith(".config"))).exists()


def test_kubernetes_manifests_embed_the_same_configs():
    documents = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "serving.yaml").read_text()))
    config_map = next(d for d in documents if d["kind"] == "ConfigMap")
    assert _model_config(config_map["data"]["models.config"]) == _model_config((DEPLOY / "models.config").read_text())
    assert _batching(config_map["data"]["batching_parameters.txt"]) == _batching(
        (DEPLOY / "batching_parameters.txt").read_text())
    gpu = yaml.safe_load((DEPLOY / "kubernetes" / "serving-gpu.yaml").read_text())
    assert gpu["spec"]["template"]["spec"]["containers"][0]["image"] == "tensorflow/serving:2.20.0-gpu"
