"""Apache Beam pipelines: ``prepare`` (raw logs -> TFRecords), ``build_index`` (catalogue
embeddings and SparCode posting lists) and ``evaluate`` (batch full ranking of an export), and
the end-to-end ``run`` that chains them with training and export.

Beam is an optional dependency (``pip install tfx_xmatch[beam]``); importing this package does
not need it, running a pipeline does.
"""
