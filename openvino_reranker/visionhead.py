"""The vision-language reranker's model head (nvidia/llama-nemotron-rerank-vl-1b-v2, exported by
tools/export_nemotron_vl.py): a decoder head whose documents may hold a page image. Images are decoded and tiled by
vision.py; the head writes each pair's prompt with the image's <IMG_CONTEXT> tokens and says, per fed row, where
its image's embeddings go (`IMAGE_ROWS`), which engine.VisionLanguageEngine turns into the language model's
`IMAGE_EMBEDS` input.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .config import ShapeBucket
from .encoding import (
    DecoderRerankerHead,
    DocumentError,
    EncodedPairs,
    ModelContract,
    PromptTemplate,
    logit_output,
    pad_pairs,
)
from .errors import EXIT_CONFIG, EXIT_MODEL, StartupError
from .images import ImageError
from .scoring import TRUNCATE_RIGHT, Document, ImageDocument, Truncation
from .vision import PreparedImage, TilingSettings, prepare_image

IMAGE_ROWS = "image_rows"  # a vision-language feed's entry that is no IR input: (row, image, first column) per image
IMAGE_EMBEDS = "image_embeds"  # the language-model IR's input that holds the image tokens' embeddings
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"


class VisionLanguageHead(DecoderRerankerHead):
    """nvidia/llama-nemotron-rerank-vl-1b-v2 (exported by tools/export_nemotron_vl.py): a decoder reranker whose
    documents may hold a page image. The pair is written as the model's processor writes it: a text document as
    `question:{query} \\n \\n passage:{document}` (BOS first), an image document as `<img>` + <IMG_CONTEXT> x (its
    tiles x tokens per tile) + `</img> question:{query} \\n \\n passage:{text}`. The image is decoded and tiled here
    (vision.py, on the request's thread: a broken image is the request's error, never a batch's); its embeddings
    are computed by the vision IR when its batch runs (engine.VisionLanguageEngine), which fills `image_embeds` at
    the <IMG_CONTEXT> positions. Image tokens are never truncated: the document's text, then the query, are cut to
    what the image leaves of max_length, which must hold the largest image (checked at startup)."""

    kind = "vision-language"
    takes_images = True
    REQUIRED_INPUTS = ("input_ids", "attention_mask", IMAGE_EMBEDS)

    def __init__(self, tokenizer, max_length: int, contract: ModelContract, template: PromptTemplate, pad_id: int,
                 tiling: TilingSettings, image_context_id: int, max_image_pixels: int, hidden_size: int):
        super().__init__(tokenizer, max_length, contract, template, pad_id)
        self.tiling, self.max_image_pixels, self.hidden_size = tiling, max_image_pixels, hidden_size
        specials = {token: self._counter.token_to_id(token) for token in (IMG_START, IMG_END, IMG_CONTEXT)}
        missing = [token for token, token_id in specials.items() if token_id is None]
        if missing:
            raise StartupError(f"the tokenizer has no {', '.join(missing)} token: it is not a vision-language "
                               f"reranker's", EXIT_MODEL)
        if specials[IMG_CONTEXT] != image_context_id:
            raise StartupError(f"config.json's img_context_token_id is {image_context_id} but the tokenizer's "
                               f"{IMG_CONTEXT} is {specials[IMG_CONTEXT]}", EXIT_MODEL)
        self.image_start_id, self.image_context_id = specials[IMG_START], image_context_id
        self.image_template = PromptTemplate(IMG_START + IMG_END + " " + template.template,
                                             template.default_instruction, template.add_special_tokens,
                                             f"{template.source}, after the image's tokens").checked()
        self.max_image_tokens = tiling.max_tiles * tiling.tokens_per_tile
        empty = len(self._counter.encode(self.image_template.fill("", "")[0],
                                         add_special_tokens=template.add_special_tokens).ids)
        if empty + self.max_image_tokens + 2 > max_length:
            raise StartupError(f"max_length {max_length} cannot hold an image document: an image of "
                               f"{tiling.max_tiles} tiles takes {self.max_image_tokens} tokens and the prompt "
                               f"{empty} more; raise --max-length to at least {empty + self.max_image_tokens + 2} "
                               f"(or lower max_input_tiles in the model's config.json)", EXIT_CONFIG)

    @classmethod
    def check_contract(cls, model) -> ModelContract:
        """Inputs input_ids, attention_mask (i64 [batch, sequence]) and image_embeds (f32 [batch, sequence,
        hidden]); an output named `logits` of [?, 1]."""
        names = [p.get_any_name() for p in model.inputs]
        if sorted(names) != sorted(cls.REQUIRED_INPUTS):
            raise StartupError(f"the model's inputs are {names}: a vision-language reranker's language model takes "
                               f"exactly {list(cls.REQUIRED_INPUTS)} (export with tools/export_nemotron_vl.py)",
                               EXIT_MODEL)
        embeds = model.input(IMAGE_EMBEDS).get_partial_shape()
        if embeds.rank.is_dynamic or embeds.rank.get_length() != 3 or embeds[2].is_dynamic:
            raise StartupError(f"the model's {IMAGE_EMBEDS} has shape {embeds}: it must be [batch, sequence, "
                               f"hidden] with a fixed hidden size", EXIT_MODEL)
        index = logit_output(model, cls.OUTPUT)
        shape = model.outputs[index].get_partial_shape()
        if shape.rank.is_dynamic or shape.rank.get_length() != 2 or shape[1].is_dynamic or shape[1].get_length() != 1:
            raise StartupError(f"the model's logits have shape {shape}: a reranker gives [batch, 1]", EXIT_MODEL)
        dtype = model.input("input_ids").get_element_type().to_dtype().type
        return ModelContract(cls.REQUIRED_INPUTS, 1, cls.OUTPUT, index, dtype)

    def describe(self) -> dict:
        return {**super().describe(), "image_tile_size": self.tiling.image_size,
                "max_input_tiles": self.tiling.max_input_tiles, "use_thumbnail": self.tiling.use_thumbnail,
                "tokens_per_tile": self.tiling.tokens_per_tile, "max_image_tokens": self.max_image_tokens}

    def encode(self, query: str | Sequence[str], texts: Sequence[Document], truncation: Truncation = TRUNCATE_RIGHT,
               instruction: str | None = None) -> EncodedPairs:
        """Text documents as DecoderRerankerHead writes them; image documents with their image's tokens after BOS.
        An image that cannot be decoded, or declares more than max_image_pixels, is a DocumentError naming its
        position in `texts`; each distinct image is decoded once per call."""
        queries = [query] * len(texts) if isinstance(query, str) else list(query)
        n = len(texts)
        ids: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * n
        truncated = np.zeros(n, dtype=bool)
        images: list[tuple[PreparedImage, int] | None] = [None] * n
        text_rows = [i for i, t in enumerate(texts) if not isinstance(t, ImageDocument)]
        image_rows = [i for i, t in enumerate(texts) if isinstance(t, ImageDocument)]
        if text_rows:
            part = self._encode_prompts([queries[i] for i in text_rows], [texts[i] for i in text_rows], truncation,
                                        instruction, self.template, [self.max_length] * len(text_rows))
            for j, i in enumerate(text_rows):
                ids[i], truncated[i] = part.ids[j], part.truncated[j]
        if image_rows:
            prepared: dict[str, PreparedImage] = {}
            for i in image_rows:
                document = texts[i]
                if document.digest not in prepared:
                    try:
                        prepared[document.digest] = prepare_image(document.image, document.digest, self.tiling,
                                                                  self.max_image_pixels)
                    except ImageError as exc:
                        raise DocumentError(i, exc.reason, exc.too_large) from None
            pictures = [prepared[texts[i].digest] for i in image_rows]
            part = self._encode_prompts([queries[i] for i in image_rows], [texts[i].text for i in image_rows],
                                        truncation, instruction, self.image_template,
                                        [self.max_length - picture.tokens for picture in pictures])
            for j, (i, picture) in enumerate(zip(image_rows, pictures, strict=True)):
                kept = part.ids[j]
                at = int(np.flatnonzero(kept == self.image_start_id)[0]) + 1
                ids[i] = np.concatenate([kept[:at], np.full(picture.tokens, self.image_context_id, np.int64),
                                         kept[at:]])
                truncated[i], images[i] = part.truncated[j], (picture, at)
        return EncodedPairs(ids=ids, type_ids=[np.zeros(len(x), dtype=np.int64) for x in ids],
                            lengths=np.array([len(x) for x in ids], dtype=np.int64), truncated=truncated,
                            images=images if image_rows else None)

    def windows(self, query: str, text: Document, max_chunks: int, instruction: str | None = None
                ) -> tuple[list[Document], bool]:
        """A text document's windows; an image document is one window (its text is truncated, never chunked)."""
        if isinstance(text, ImageDocument):
            return [text], False
        return super().windows(query, text, max_chunks, instruction)

    def feed(self, encoded: EncodedPairs, rows: Sequence[int], shape: ShapeBucket) -> dict:
        """input_ids and attention_mask padded on the left, and, under IMAGE_ROWS, each row's image with the column
        of its first <IMG_CONTEXT> token: the engine turns those into `image_embeds`."""
        feed: dict = pad_pairs(encoded, rows, shape, ("input_ids", "attention_mask"), self.pad_id,
                               self.contract.input_dtype, self.padding_side)
        sources = list(rows) + [rows[-1]] * (shape.rows - len(rows))
        image_rows = []
        for row, i in enumerate(sources):
            entry = encoded.images[i] if encoded.images is not None else None
            if entry is not None:
                picture, at = entry
                image_rows.append((row, picture, shape.length - int(encoded.lengths[i]) + at))
        feed[IMAGE_ROWS] = image_rows
        return feed
