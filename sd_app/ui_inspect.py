"""The Inspect view's computations: the pipeline explained with the user's own prompt and images.

Tokens and ids (77-position chunks, emphasis weights), the shapes of the text embedding, latents and
images, and CLIP's image-vs-text similarity table with its 2-D PCA map. No Gradio here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

    from pipelines.generation.text_to_image import TextToImagePipeline
    from pipelines.rerank.clip_scorer import ClipScorer
    from sd_app.engine import GenerationResult

TOKEN_HEADERS = ["chunk", "position", "token", "id", "weight"]


def token_rows(tokenizer: Any, prompt: str) -> list[list[Any]]:
    """One row per position up to each chunk's end-of-text token: chunk, position, token, id, weight."""
    from pipelines.generation.prompts import chunk_prompt

    encoded = chunk_prompt(tokenizer, prompt)
    eos = tokenizer.eos_token_id
    rows: list[list[Any]] = []
    for chunk, (ids, weights) in enumerate(zip(encoded.input_ids, encoded.weights)):
        tokens = tokenizer.convert_ids_to_tokens(ids)
        for position, (token, token_id, weight) in enumerate(zip(tokens, ids, weights)):
            rows.append([chunk, position, token, token_id, round(weight, 3)])
            if position > 0 and token_id == eos:
                break  # the rest is padding
    return rows


def embedding_shapes(
    pipe: TextToImagePipeline, prompt: str, negative: str, cfg: float, width: int, height: int, n: int
) -> str:
    """Markdown listing the tensors of one request, the text embedding computed for real."""
    import torch

    from pipelines.generation.prompts import count_tokens

    with torch.inference_mode():
        states = pipe.encode_prompt(prompt, negative, 1, guided=True)  # [2, 77k, D]
    _, length, dim = states.shape
    channels = pipe.components.unet.config.in_channels
    factor = pipe.vae_scale_factor
    count = count_tokens(pipe.components.tokenizer, prompt)
    guided = cfg > 1.0
    unet_batch = 2 * n if guided else n
    return "\n".join(
        [
            f"- prompt: **{count.tokens} tokens** in {count.chunks} chunk(s) of 75 "
            f"(each wrapped in start/end tokens and padded to 77 positions)",
            f"- text embedding (CLIP text encoder output): `[1, {length}, {dim}]` per prompt",
            f"- U-Net text conditioning: `[{unet_batch}, {length}, {dim}]` "
            + ("(negative + positive for classifier-free guidance)" if guided else "(CFG <= 1: no guidance)"),
            f"- latents: `[{n}, {channels}, {height // factor}, {width // factor}]` "
            f"(the VAE shrinks each side {factor}x)",
            f"- images: `[{n}, 3, {height}, {width}]` after VAE decoding",
        ]
    )


def similarity(
    scorer: ClipScorer, result: GenerationResult, extra_texts: list[str]
) -> tuple[dict[str, Any], Image.Image]:
    """CLIP score table (100 * cosine) of the result's images vs its prompt + extra texts, and the PCA map."""
    from pipelines.rerank.embedding_map import embedding_map
    from pipelines.rerank.prompt_text import scoring_prompt

    texts = list(dict.fromkeys([scoring_prompt(result.request.prompt), *extra_texts]))  # unique, prompt first
    images = result.images
    image_features = scorer.image_features(images)  # [N, D]
    text_features, _ = scorer.text_features(texts)  # [T, D]
    cosines = (image_features @ text_features.T).tolist()  # [N, T]
    labels = [f"seed {c.seed}" for c in result.candidates]
    headers = ["image", *[t if t else "(empty prompt)" for t in texts]]
    rows = [[label, *[round(100 * c, 2) for c in row]] for label, row in zip(labels, cosines)]
    pca = embedding_map(image_features, text_features, texts, images=images, image_labels=labels)
    return {"headers": headers, "data": rows}, pca
