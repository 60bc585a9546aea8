"""Which AUTOMATIC1111 request fields (txt2img and img2img) we honour, which we may ignore, and which we must refuse.

A client of A1111's API (``StableDiffusionTxt2ImgProcessingAPI``) sends many fields, most at their
defaults. A field we do not implement is refused (422, naming it) only when its value would change the
picture in A1111; at its "off" value it is accepted, so existing clients keep working. Fields A1111
itself would not use for the picture (saving options, ``subseed`` without ``subseed_strength``, hires
options without ``enable_hr``) are accepted and ignored. Anything else is an unknown field: refused,
and never echoed back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipelines.generation.request import VAE_DECODERS, canonical_decoder

# Never change the picture (saving, bookkeeping), or only matter with a switch that is off by default.
IGNORED = frozenset(
    {
        "do_not_save_samples", "do_not_save_grid", "comments", "force_task_id",
        "override_settings_restore_afterwards", "subseed", "sampler_index",
        "send_images", "save_images", "denoising_strength", "firstphase_width", "firstphase_height",
        "hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x", "hr_resize_y", "hr_checkpoint_name",
        "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt", "hr_additional_modules",
        "refiner_switch_at",
        "image_cfg_scale",  # only InstructPix2Pix models read it; sd-app runs none
    }
)
# Would change the picture; accepted only at a value meaning "off" (A1111's defaults).
OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "enable_hr": (None, False),
    "restore_faces": (None, False),
    "tiling": (None, False),
    "subseed_strength": (None, 0),
    "seed_resize_from_h": (None, -1, 0),
    "seed_resize_from_w": (None, -1, 0),
    "styles": (None, []),
    "script_name": (None, ""),
    "script_args": (None, []),
    "alwayson_scripts": (None, {}),
    "refiner_checkpoint": (None, "", "None"),
    "s_min_uncond": (None, 0),
    "s_churn": (None, 0),
    "s_tmin": (None, 0),
    "s_tmax": (None, 0),  # A1111 reads 0 as infinity, its default
    "s_noise": (None, 1),
    "token_merging_ratio": (None, 0),
    "token_merging_ratio_hr": (None, 0),
    "disable_extra_networks": (None, False),  # True: A1111 would drop the prompt's <lora:...> tags
    "infotext": (None, ""),  # A1111 fills the fields a request leaves unset from it
    "firstpass_image": (None, ""),  # A1111's hires fix would start from it
}
# eta as A1111 applies it to the ancestral/SDE samplers (default 1), which sd-app runs at that value only.
# DDIM's eta and TCD's gamma are the request's (GenerationRequest.eta); the other samplers ignore eta in
# A1111, so any value is accepted for them.
ETA_WE_RUN = {"Euler a": 1.0, "DPM2 a": 1.0, "DPM++ SDE": 1.0, "DPM++ 2M SDE": 1.0}


def check_fields(extra: Mapping[str, Any], sampler_name: str, known: set[str]) -> None:
    """Raise ValueError naming the fields of ``extra`` (those the request model did not declare) that we
    cannot honour. ``sampler_name``: the resolved A1111 sampler, for ``eta``; ``known``: fields the
    route's model declares (they are never unknown)."""
    accepted = known | IGNORED | OFF_VALUES.keys() | {"eta"}
    unknown = sorted(name for name in extra if name not in accepted)
    if unknown:
        raise ValueError(f"unknown field(s): {', '.join(unknown)} (not A1111 txt2img fields sd-app accepts)")
    refused = [name for name, value in extra.items() if name in OFF_VALUES and value not in OFF_VALUES[name]]
    if refused:
        shown = ", ".join(f"{name}={_short(extra[name])}" for name in sorted(refused))
        raise ValueError(f"not supported by sd-app: {shown}; leave these unset or at their defaults")
    eta = extra.get("eta")
    if eta is not None and not isinstance(eta, (int, float)):
        raise ValueError(f"eta must be a number, got {_short(eta)}")
    if eta is not None and sampler_name in ETA_WE_RUN and float(eta) != ETA_WE_RUN[sampler_name]:
        raise ValueError(
            f"eta={_short(eta)} is not supported for {sampler_name}; sd-app runs it with eta "
            f"{ETA_WE_RUN[sampler_name]:g}"
        )


# A1111 options sd-app honours (POST /sdapi/v1/options, a request's override_settings); the rest are refused.
OPTIONS = ("sd_model_checkpoint", "sd_vae", "CLIP_stop_at_last_layers", "sd_vae_decode_method")
NO_OP_OPTIONS = {"samples_format": ("png",)}
# Shown by GET /options but set on the server's command line: accepted at their current value (so that the
# options read can be posted back), refused otherwise (sd_app.api_models.check_server_options).
SERVER_OPTIONS = ("sd_checkpoints_limit",)


def check_options(options: Any, field: str = "options") -> dict[str, Any]:
    """The options sd-app honours from an A1111 options dict; ValueError naming the others or a bad value."""
    if not isinstance(options, Mapping):
        raise ValueError(f"{field} must be a JSON object of A1111 options, got {_short(options)}")
    refused = sorted(
        name for name, value in options.items()
        if name not in OPTIONS + SERVER_OPTIONS and not (name in NO_OP_OPTIONS and value in NO_OP_OPTIONS[name])
    )
    if refused:
        raise ValueError(
            f"{field}: not supported by sd-app: {', '.join(refused)} (supported: {', '.join(OPTIONS)}; "
            f"{', '.join(SERVER_OPTIONS)} at the server's value)"
        )
    wanted = {name: options[name] for name in OPTIONS + SERVER_OPTIONS if name in options}
    for name in ("sd_model_checkpoint", "sd_vae"):
        if name in wanted and (not isinstance(wanted[name], str) or not wanted[name].strip()):
            raise ValueError(f"{field}: {name} must be a checkpoint / VAE name, got {_short(wanted[name])}")
    skip = wanted.get("CLIP_stop_at_last_layers")
    if skip is not None and (isinstance(skip, bool) or not isinstance(skip, int) or not 1 <= skip <= 12):
        raise ValueError(f"{field}: CLIP_stop_at_last_layers must be an integer from 1 to 12, got {_short(skip)}")
    if "sd_vae_decode_method" in wanted:  # any case, as a request takes it
        wanted["sd_vae_decode_method"] = canonical_decoder(wanted["sd_vae_decode_method"])
    decoder = wanted.get("sd_vae_decode_method")
    if decoder is not None and decoder not in VAE_DECODERS:
        raise ValueError(
            f"{field}: sd_vae_decode_method must be one of {', '.join(VAE_DECODERS)}, got {_short(decoder)}"
        )
    return wanted


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
