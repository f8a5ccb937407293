"""The checkpoint formats a point of a search can be exported as: their names on the wire, in the CLI
and in the SDK, written once.

A dependency-free leaf (standard library only): the service validates a download's ``format`` with
it, the SDK and the CLI pass it through, and :mod:`search.export.formats` maps each name to its writer.

==========================  =====================================================================================
name                        what the directory holds
==========================  =====================================================================================
``native``                  bitscout's packed artifact (``model.quant.safetensors``, format ``bitscout.quant``):
                            every option the search has, bit-identical on reload with :func:`bitscout.apply`
``compressed-tensors``      a checkpoint in the compressed-tensors format whose ``config.json`` carries the
                            ``quantization_config``: plain transformers (with the ``compressed-tensors``
                            package) loads it with ``AutoModel*.from_pretrained``
``dense``                   a plain ``model.safetensors`` of the quantized-dequantized weights in the model's
                            dtype, which any transformers version loads
==========================  =====================================================================================
"""

from __future__ import annotations

__all__ = ["COMPRESSED_TENSORS", "DENSE", "DEFAULT_EXPORT_FORMAT", "EXPORT_FORMATS", "NATIVE", "parse_export_format"]

NATIVE = "native"
COMPRESSED_TENSORS = "compressed-tensors"
DENSE = "dense"

#: Every export format, in the order the CLI's help lists them.
EXPORT_FORMATS: tuple[str, ...] = (NATIVE, COMPRESSED_TENSORS, DENSE)

#: The format of a download or an export that names none.
DEFAULT_EXPORT_FORMAT = NATIVE


def parse_export_format(value: object) -> str:
    """``value`` as an export format name (case and surrounding space ignored); raises
    :class:`ValueError` naming the accepted names otherwise.

    >>> parse_export_format(" Compressed-Tensors ")
    'compressed-tensors'
    """
    if isinstance(value, str):
        name = value.strip().lower()
        if name in EXPORT_FORMATS:
            return name
    raise ValueError(f"format must be one of {', '.join(EXPORT_FORMATS)}; got {value!r}")
