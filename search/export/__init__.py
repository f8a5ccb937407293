"""Taking a search's result away: a precision map as a quantized checkpoint, back onto a model, or
onto torchao's own kernels.

One module per checkpoint format, all reading the same map and space (:mod:`search.export.common`
holds what they share):

module                              what
==================================  =========================================================================
:mod:`search.export.artifact`       the native packed artifact (``bitscout.quant``): integer codes packed at
                                    their bit-width, float16 scales, bit-identical on reload
                                    (:func:`export_artifact`, :func:`load_artifact`, :func:`artifact_info`)
:mod:`search.export.apply`          a map or an artifact's map applied to a user's model in place, exactly as
                                    the search evaluated it (:func:`apply_precision_map`)
:mod:`search.export.packed`         the modules a map or an artifact is applied as by default: integer codes
                                    kept packed in memory, dequantized per forward pass, bit-identical
:mod:`search.export.packed`                 the modules a map or an artifact is applied as by default: integer codes
                                            kept packed in memory, dequantized per forward pass, bit-identical
:mod:`search.export.formats`        one entry point over every format (:func:`export_point`, names in
                                    :mod:`bitscout.formats`) and what it wrote (:class:`ExportReport`)
:mod:`search.export.torchao`        the part of a map torchao's int4/int8 weight-only kernels can run, as
                                    per-module torchao configs (:func:`to_torchao_config`), and why the rest
                                    cannot (:func:`torchao_unsupported`)
==================================  =========================================================================
=======
==========================================  =========================================================================
module                                      what
==========================================  =========================================================================
:mod:`search.export.artifact`               the native packed artifact (``bitscout.quant``): integer codes packed at
                                            their bit-width, float16 scales, bit-identical on reload
                                            (:func:`export_artifact`, :func:`load_artifact`, :func:`artifact_info`,
                                            :func:`read_quantization`); a map quantized once for every format
                                            (:func:`quantize_point`)
:mod:`search.export.compressed_tensors`     a checkpoint in the compressed-tensors format (its own config
                                            classes and packer) that plain transformers loads to the search's outputs
:mod:`search.export.dense`                  a plain ``model.safetensors`` of the dequantized weights any transformers
                                            loads
:mod:`search.export.apply`                  a map or an artifact's map applied to a user's model in place, exactly as
                                            the search evaluated it (:func:`apply_precision_map`)
:mod:`search.export.formats`                one entry point over every format (:func:`export_point`, names in
                                            :mod:`bitscout.formats`), a native artifact in another format
                                            (:func:`export_stored`), and what it wrote (:class:`ExportReport`)
:mod:`search.export.torchao`                the part of a map torchao's int4/int8 weight-only kernels can run, as
                                            per-module torchao configs (:func:`to_torchao_config`), and why the rest
                                            cannot (:func:`torchao_unsupported`)
==========================================  =========================================================================

``bitscout export --format`` (:mod:`search.export_cli`) is the command line over these. What each
format holds, what compressed-tensors cannot express, measured sizes and times:
``docs/methods/export.md``.
"""

from __future__ import annotations

from search.export.apply import apply_precision_map
from search.export.artifact import (
    ARTIFACT_FILE,
    FORMAT,
    FORMAT_VERSION,
    PRECISION_MAP_FILE,
    ArtifactInfo,
    QuantizedPoint,
    StoredQuantization,
    artifact_info,
    export_artifact,
    load_artifact,
    quantize_point,
    read_quantization,
)
from search.export.formats import WRITERS, ExportReport, export_point, export_stored
from search.export.torchao import (
    TORCHAO_INT4_GROUP_SIZES,
    TorchaoConfig,
    to_torchao_config,
    torchao_unsupported,
)

__all__ = [
    "ARTIFACT_FILE",
    "ArtifactInfo",
    "ExportReport",
    "FORMAT",
    "FORMAT_VERSION",
    "PRECISION_MAP_FILE",
    "QuantizedPoint",
    "StoredQuantization",
    "TORCHAO_INT4_GROUP_SIZES",
    "TorchaoConfig",
    "WRITERS",
    "apply_precision_map",
    "artifact_info",
    "export_artifact",
    "export_point",
    "export_stored",
    "load_artifact",
    "quantize_point",
    "read_quantization",
    "to_torchao_config",
    "torchao_unsupported",
]
