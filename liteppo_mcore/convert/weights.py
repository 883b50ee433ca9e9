"""Whole megatron tensors from a Hugging Face checkpoint (lazily) and HF tensors from megatron ones.

`MegatronView` is a read-only mapping {whole megatron name: tensor} over a HF directory that builds
each tensor only when asked, so `models.state.load_whole_state_dict` streams a HF checkpoint into any
TP/PP layout: each rank reads, fuses and shards one tensor at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from torch import Tensor

from liteppo_mcore.convert.hf_files import SafetensorsReader
from liteppo_mcore.convert.layout import ConversionError, TensorLayout
from liteppo_mcore.convert.names import (
    EMBEDDING,
    HF_LM_HEAD,
    OUTPUT_LAYER,
    Source,
    canonical_name,
    hf_shapes,
    ignored_hf_name,
    megatron_sources,
    to_hf,
    to_megatron,
)


def check_hf_tensors(reader: SafetensorsReader, layout: TensorLayout, where: str = "") -> None:
    """Every tensor the config implies is there with its shape, and nothing else is (from the file
    headers only). A checkpoint that disagrees with its config would otherwise load into a model that
    runs and scores zero."""
    where = where or reader.hf_dir
    expected = hf_shapes(layout)
    missing = [name for name in expected if name not in reader]
    if missing:
        hint = ""
        if missing == [HF_LM_HEAD]:
            hint = " config.json says tie_word_embeddings=false; if the model ties them, set it to true."
        raise ConversionError(f"{where}: {len(missing)} tensors that config.json implies are missing, "
                              f"e.g. {missing[:3]}.{hint} Is the download complete, and is config.json the "
                              "model's own?")
    for name, shape in expected.items():
        found = reader.shape(name)
        if found != shape:
            raise ConversionError(f"{where}: tensor {name} has shape {list(found)} but config.json implies "
                                  f"{list(shape)}. The weights and config.json do not belong together: "
                                  "restore the model's own config.json.")
    unexpected = [n for n in reader.names() if n not in expected and not ignored_hf_name(n, layout)]
    if unexpected:
        raise ConversionError(f"{where}: {len(unexpected)} tensors that config.json does not account for, "
                              f"e.g. {unexpected[:3]}. Check num_hidden_layers and the architecture in "
                              "config.json.")


class MegatronView(Mapping[str, Tensor]):
    """{whole megatron name: tensor} over a Hugging Face checkpoint, built on access (never cached).

    Names may use Transformer Engine's norm names too. A tied model has no `output_layer.weight`
    here: `load_whole_state_dict` then takes the embedding, as megatron ties it.
    """

    def __init__(self, reader: SafetensorsReader, layout: TensorLayout):
        self.reader, self.layout = reader, layout
        self._sources: dict[str, Source] = megatron_sources(layout)

    def _source(self, name: str) -> Source:
        source = self._sources.get(canonical_name(name))
        if source is None:
            raise KeyError(name)
        return source

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and canonical_name(name) in self._sources

    def __getitem__(self, name: str) -> Tensor:
        source = self._source(name)
        tensors = []
        for hf_name, shape in zip(source.hf_names, source.hf_shapes):
            tensor = self.reader.get(hf_name)
            if tuple(tensor.shape) != shape:
                raise ConversionError(f"{self.reader.hf_dir}: tensor {hf_name} has shape {list(tensor.shape)} "
                                      f"but config.json implies {list(shape)}.")
            tensors.append(tensor)
        return to_megatron(source, tensors, self.layout)

    def __iter__(self) -> Iterator[str]:
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)


def hf_tensors(named: Iterable[tuple[str, Tensor]], layout: TensorLayout) -> Iterator[tuple[str, Tensor]]:
    """HF (name, tensor) pairs from whole megatron (name, tensor) pairs, one megatron tensor at a time.

    Vocabulary rows beyond the real vocabulary (TP padding) are dropped; a tied model's output layer,
    if given, is skipped (Hugging Face ties it to the embedding); every expected tensor must come.
    """
    sources = megatron_sources(layout)
    seen: list[str] = []
    for name, tensor in named:
        name = canonical_name(name)
        if name == OUTPUT_LAYER and layout.tie_word_embeddings:
            continue
        if name in (EMBEDDING, OUTPUT_LAYER):
            if tensor.shape[0] < layout.vocab_size:
                raise ConversionError(f"{name} has {tensor.shape[0]} rows, fewer than the vocabulary "
                                      f"({layout.vocab_size}) of config.json.")
            tensor = tensor[: layout.vocab_size]
        seen.append(name)
        yield from to_hf(name, tensor, layout, sources)
    absent = [n for n in sources if n not in seen]
    if absent:
        raise ConversionError(f"the checkpoint lacks {len(absent)} tensors of the model, e.g. {absent[:3]}.")
