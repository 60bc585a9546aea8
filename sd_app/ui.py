"""The browser UI: Gradio Blocks with Generate, Image to image, Inspect, Score, Rerank and PNG info views.

``build_demo(engine)`` only builds the layout; models load on first use. Serve it with
``sd_app.server`` (which adds the HTTP API and auth) or ``build_demo(engine).launch()``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipelines.generation.conditioning import (
    LATENT_UPSCALERS,
    MASKED_CONTENT,
    PIXEL_UPSCALERS,
    RESIZE_MODES,
    HiresFix,
    ImageConditioning,
)
from pipelines.generation.request import LIMITS, VAE_DECODERS, GenerationRequest
from pipelines.generation.schedulers import sampler_names

if TYPE_CHECKING:
    import gradio as gr

    from sd_app.engine import Engine
    from sd_app.ui_jobs import JobTracker

MAX_QUEUE = 16
MODEL_GROUP = "model"  # one event at a time uses the model (generate, inspect, score)
CSS = "#status {min-height: 2em} .token-counter {text-align: right; opacity: 0.75}"


def build_demo(
    engine: Engine, tracker: JobTracker | None = None, max_queue: int = MAX_QUEUE, local_paths: bool = False
) -> gr.Blocks:
    """The Blocks app for ``engine``, queued: one generation at a time, at most ``max_queue`` waiting, at most the
    tracker's ``max_waiting_per_client`` of one address's generations (``sd_app.ui_admission``).

    ``local_paths``: the Rerank view may read a typed folder and copy anywhere (serving on localhost only).
    """
    import gradio as gr
    from PIL import Image

    from sd_app.ui_handlers import RERANK_CHOICES, UiHandlers, UserSession
    from sd_app.ui_image import INPAINT_AREAS, MASK_MODES, SIDES
    from sd_app.ui_inspect import TOKEN_HEADERS
    from sd_app.ui_jobs import JobTracker
    from sd_app.ui_rerank import RerankView
    from sd_app.ui_uploads import checked_upload, refuse_unreadable

    handlers = UiHandlers(engine, tracker or JobTracker(max_waiting=max_queue))
    rerank_view = RerankView(engine, local_paths=local_paths)
    scorer_names = ", ".join(engine.available_scorers()) or "none"
    default_scorers = ", ".join(f"{k}:{v:g}" for k, v in engine.default_weights().items()) if engine.scorers else ""
    defaults = GenerationRequest()
    with gr.Blocks(title="sd-app", analytics_enabled=False) as demo:
        session = gr.State(UserSession)  # the Generate view's results (and Inspect's, Rerank's)
        image_session = gr.State(UserSession)  # the Image to image view's own: its gallery, Send and stop buttons
        shown = gr.State(None)  # the server's selection as this page shows it (sd_app.ui_selection)
        gr.Markdown("## sd-app · Stable Diffusion 1.x with CLIP reranking")
        with gr.Tabs() as tabs:
            with gr.Tab("Generate", id="generate"):
                with gr.Row():
                    with gr.Column(scale=3):
                        prompt = gr.Textbox(
                            label="Prompt",
                            lines=3,
                            elem_id="prompt",
                            placeholder="a red circle on a blue background; (word:1.2) for emphasis",
                        )
                        counter = gr.Markdown("0/75 tokens", elem_classes=["token-counter"], elem_id="token-counter")
                        negative = gr.Textbox(label="Negative prompt", lines=2, elem_id="negative")
                    with gr.Column(scale=1, min_width=180):
                        generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
                        with gr.Row():  # A1111's: stop keeping what was made, or stop the current batch only
                            interrupt_button = gr.Button("Interrupt", variant="stop", elem_id="interrupt",
                                                         min_width=60)
                            skip_button = gr.Button("Skip", elem_id="skip", min_width=60)
                        cancel_button = gr.Button("Cancel", size="sm", elem_id="cancel")  # keeps nothing
                with gr.Row():
                    checkpoint = gr.Dropdown(handlers.checkpoint_choices(), value=handlers.checkpoint_value(),
                                             label="Checkpoint", elem_id="checkpoint", scale=3)
                    vae = gr.Dropdown(handlers.vae_choices(), value=handlers.vae_value(), label="VAE",
                                      elem_id="vae", scale=2)
                    refresh_models = gr.Button("🔄 Refresh", size="sm", elem_id="refresh-models", scale=0)
                with gr.Row():
                    with gr.Column(scale=1):
                        sampler = gr.Dropdown(sampler_names(), value=defaults.sampler, label="Sampler")
                        steps = gr.Slider(
                            *LIMITS["steps"], value=defaults.steps, step=1, label="Steps", elem_id="steps"
                        )
                        cfg = gr.Slider(0, 30, value=defaults.cfg_scale, step=0.5, label="CFG scale", elem_id="cfg")
                        with gr.Row():
                            width = gr.Slider(
                                64, LIMITS["width"][1], value=defaults.width, step=8, label="Width", elem_id="width"
                            )
                            height = gr.Slider(
                                64, LIMITS["height"][1], value=defaults.height, step=8, label="Height", elem_id="height"
                            )
                        with gr.Row():
                            seed = gr.Number(value=-1, label="Seed (-1 = random)", elem_id="seed")
                            reuse = gr.Button("♻ Last seed", size="sm", elem_id="reuse-seed")
                        with gr.Row():
                            n = gr.Slider(*LIMITS["n"], value=4, step=1, label="Candidates", elem_id="candidates")
                            rerank = gr.Dropdown(
                                [(label, value) for label, value in RERANK_CHOICES.items()],
                                value="clip" if engine.reranker is not None else "off",
                                label="Rerank by",
                                interactive=engine.reranker is not None,
                                elem_id="rerank-by",
                            )
                        hires_defaults = HiresFix()
                        with gr.Accordion("Hires fix", open=False):
                            hires_on = gr.Checkbox(value=False, label="Upscale and denoise again", elem_id="hires")
                            with gr.Row():
                                hires_scale = gr.Slider(1, 4, value=hires_defaults.scale, step=0.05, label="Upscale by")
                                hires_upscaler = gr.Dropdown(
                                    [*LATENT_UPSCALERS, *PIXEL_UPSCALERS], value=hires_defaults.upscaler,
                                    label="Upscaler",
                                )
                            with gr.Row():
                                hires_steps = gr.Slider(
                                    0, LIMITS["steps"][1], value=0, step=1, label="Hires steps (0 = same)"
                                )
                                hires_denoise = gr.Slider(
                                    0, 1, value=hires_defaults.denoising_strength, step=0.01,
                                    label="Denoising strength",
                                )
                            hires_resize = gr.Textbox(
                                "", label="Or resize to WxH (A1111's hires resize; 0 keeps the aspect)",
                                placeholder="e.g. 1024x768; empty: Upscale by",
                            )
                        with gr.Row():
                            clip_skip = gr.Slider(*LIMITS["clip_skip"], value=engine.clip_skip, step=1,
                                                  label="Clip skip", elem_id="clip-skip")
                            vae_decoder = gr.Radio(list(VAE_DECODERS), value=engine.vae_decoder, elem_id="vae-decoder",
                                                   label="VAE decoder (TAESD: the fast tiny one)")
                        with gr.Accordion("LoRA and embeddings", open=False):
                            with gr.Row():
                                network = gr.Dropdown(handlers.network_choices(), value=None, label="Add to the prompt",
                                                      elem_id="network", scale=3)
                                network_weight = gr.Slider(-1, 2, value=1, step=0.05, label="LoRA weight", scale=2)
                                add_network = gr.Button("➕ Add", size="sm", elem_id="add-network", scale=0)
                        with gr.Accordion("Scorers and minimum score", open=bool(engine.scorers)):
                            scorer_text = gr.Textbox(
                                value=default_scorers, label="Scorers, name:weight (overrides Rerank by)",
                                placeholder="clip:1, aesthetic:0.5", info=f"available: {scorer_names}",
                                elem_id="scorers",
                            )
                            with gr.Row():
                                min_score = gr.Textbox(
                                    value="", label="Minimum score, [name=]value", placeholder="aesthetic=5.5",
                                    info="regenerate with new seeds until a candidate reaches it", elem_id="min-score",
                                )
                                extra_rounds = gr.Slider(0, 10, value=3, step=1, label="Extra rounds at most",
                                                         elem_id="extra-rounds")
                        with gr.Accordion("Early pruning", open=False):
                            with gr.Row():
                                prune_to = gr.Slider(0, LIMITS["n"][1] - 1, value=0, step=1,
                                                     label="Finish only the best (0 = all)", elem_id="prune-to")
                                prune_at = gr.Slider(0, LIMITS["steps"][1] - 1, value=0, step=1,
                                                     label="Scored after step", elem_id="prune-at")
                    with gr.Column(scale=2):
                        status = gr.Markdown("", elem_id="status")
                        previews = gr.Gallery(
                            label="Live latent previews", columns=4, height=200, format="png", elem_id="previews"
                        )
                        gallery = gr.Gallery(label="Candidates, best first", columns=4, format="png", elem_id="gallery")
                        parameters = gr.Textbox(
                            label="Parameters (click an image for its own)",
                            lines=4,
                            elem_id="parameters",
                            buttons=["copy"],
                        )
                        files = gr.File(label="PNGs with metadata", file_count="multiple", elem_id="files")
                        send_result = gr.Button("Send to Image to image", size="sm", elem_id="send-to-img2img")
            with gr.Tab("Image to image", id="img2img"):
                image_defaults = ImageConditioning(Image.new("RGB", (8, 8)))
                with gr.Row():
                    with gr.Column(scale=3):
                        editor = checked_upload(gr.ImageEditor(
                            label="Init image: paint over what to repaint (no strokes = img2img)",
                            type="pil",
                            format="png",
                            brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"),
                            elem_id="init-image",
                        ), "Init image")
                        with gr.Accordion("Or upload a mask (white = repaint)", open=False):
                            mask_upload = checked_upload(
                                gr.Image(label="Mask", type="pil", image_mode="L", format="png", elem_id="mask-upload"),
                                "Mask")
                    with gr.Column(scale=2):
                        i_prompt = gr.Textbox(label="Prompt", lines=2, elem_id="img2img-prompt")
                        i_negative = gr.Textbox(label="Negative prompt", lines=1)
                        with gr.Row():
                            i_generate = gr.Button("Generate", variant="primary", elem_id="img2img-generate")
                            i_interrupt = gr.Button("Interrupt", variant="stop", elem_id="img2img-interrupt")
                            i_skip = gr.Button("Skip", elem_id="img2img-skip")
                            i_cancel = gr.Button("Cancel", elem_id="img2img-cancel")
                        strength = gr.Slider(
                            0, 1, value=image_defaults.strength, step=0.01, label="Denoising strength",
                            elem_id="strength",
                        )
                        with gr.Row():
                            i_sampler = gr.Dropdown(sampler_names(), value=defaults.sampler, label="Sampler")
                            i_steps = gr.Slider(*LIMITS["steps"], value=defaults.steps, step=1, label="Steps")
                        i_cfg = gr.Slider(0, 30, value=defaults.cfg_scale, step=0.5, label="CFG scale")
                        with gr.Row():
                            i_width = gr.Slider(0, LIMITS["width"][1], value=0, step=8, label="Width (0 = image's)")
                            i_height = gr.Slider(0, LIMITS["height"][1], value=0, step=8, label="Height (0 = image's)")
                        with gr.Row():
                            i_seed = gr.Number(value=-1, label="Seed (-1 = random)")
                            i_n = gr.Slider(*LIMITS["n"], value=1, step=1, label="Candidates")
                            i_rerank = gr.Checkbox(
                                value=engine.reranker is not None, label="Rerank by CLIP score",
                                interactive=engine.reranker is not None,
                            )
                        with gr.Row():
                            resize_mode = gr.Radio(
                                list(RESIZE_MODES), value=image_defaults.resize_mode, label="Resize mode"
                            )
                            i_vae_decoder = gr.Radio(list(VAE_DECODERS), value=engine.vae_decoder,
                                                     elem_id="img2img-vae-decoder",
                                                     label="VAE decoder (TAESD: the fast tiny one)")
                        with gr.Accordion("Inpainting", open=True):
                            with gr.Row():
                                mask_blur = gr.Slider(0, 64, value=image_defaults.mask_blur, step=1, label="Mask blur")
                                masked_content = gr.Radio(
                                    list(MASKED_CONTENT), value=image_defaults.masked_content, label="Masked content"
                                )
                            with gr.Row():
                                mask_mode = gr.Radio(list(MASK_MODES), value=MASK_MODES[0], label="Mask mode")
                                inpaint_area = gr.Radio(
                                    list(INPAINT_AREAS), value=INPAINT_AREAS[0], label="Inpaint area"
                                )
                                padding = gr.Slider(
                                    0, 256, value=image_defaults.padding, step=4, label="Only masked padding, px"
                                )
                        with gr.Accordion("Outpainting", open=False):
                            with gr.Row():
                                outpaint = gr.Slider(0, 512, value=0, step=8,
                                                     label="Pad the canvas by, px (Masked content turns to fill)")
                                sides = gr.CheckboxGroup(list(SIDES), value=list(SIDES), label="Sides")
                i_status = gr.Markdown("", elem_id="img2img-status")
                i_previews = gr.Gallery(label="Live latent previews", columns=4, height=160, format="png")
                i_gallery = gr.Gallery(
                    label="Candidates, best first", columns=4, format="png", elem_id="img2img-gallery"
                )
                i_parameters = gr.Textbox(label="Parameters", lines=3, buttons=["copy"])
                i_files = gr.File(label="PNGs with metadata", file_count="multiple")
            with gr.Tab("Inspect", id="inspect"):
                gr.Markdown(
                    "How the last request went through the pipeline: tokens, tensor shapes, the "
                    "latents at every step, and how CLIP sees the images against the texts."
                )
                extra_texts = gr.Textbox(label="More texts to compare (one per line)", lines=2)
                inspect_button = gr.Button("Inspect the current prompt and last images")
                shapes = gr.Markdown()
                tokens = gr.Dataframe(headers=TOKEN_HEADERS, label="Tokens and ids", max_height=300)
                step_gallery = gr.Gallery(
                    label="Latents per step (first image)", columns=10, height=160, fit_columns=False
                )
                with gr.Row():
                    sim_table = gr.Dataframe(label="CLIP score (100 × cosine), images × texts")
                    pca_map = gr.Image(label="2-D PCA map of CLIP embeddings", type="pil")
            with gr.Tab("Score", id="score"):
                gr.Markdown(
                    "Zero-shot CLIP: which text fits each image best "
                    "(cosine, logit = scale × cosine, softmax probability over the texts)."
                )
                score_files = gr.File(label="Images", file_count="multiple", file_types=["image"])
                score_texts = gr.Textbox(label="Texts, one per line", lines=4, value="a cat\na dog\na car")
                score_button = gr.Button("Score", variant="primary")
                score_table = gr.Dataframe(
                    headers=["image", "text", "cosine", "logit", "probability"], label="Zero-shot table"
                )
            with gr.Tab("Rerank", id="rerank"):
                gr.Markdown(
                    "Rank images you already have against a prompt: every scorer's number, best first. "
                    "Several scorers combine by weight over their standardised scores (z over these images)."
                )
                with gr.Row():
                    with gr.Column(scale=2):
                        rr_files = gr.File(label="Images", file_count="multiple", file_types=["image"],
                                           elem_id="rerank-files")
                        rr_folder = gr.Textbox(
                            label="Or a folder on this computer" + ("" if local_paths else " (localhost only)"),
                            placeholder="/path/to/images", interactive=local_paths, elem_id="rerank-folder",
                        )
                    with gr.Column(scale=2):
                        rr_prompt = gr.Textbox(label="Prompt", lines=2, elem_id="rerank-prompt")
                        rr_scorers = gr.CheckboxGroup(rerank_view.scorer_choices(), value=rerank_view.default_choice(),
                                                      label="Scorers", elem_id="rerank-scorers")
                        rr_weights = gr.Textbox(label="Weights (optional), name:weight", placeholder="aesthetic:0.5",
                                                elem_id="rerank-weights")
                        rr_button = gr.Button("Rerank", variant="primary", elem_id="rerank-button")
                rr_status = gr.Markdown("", elem_id="rerank-status")
                rr_table = gr.Dataframe(label="Best first", elem_id="rerank-table", max_height=400)
                rr_gallery = gr.Gallery(label="Best first", columns=6, format="png", elem_id="rerank-gallery")
                with gr.Row():
                    rr_csv = gr.File(label="CSV", elem_id="rerank-csv")
                    with gr.Column():
                        with gr.Row():
                            rr_k = gr.Number(value=4, precision=0, label="Keep the best K", elem_id="rerank-k")
                            rr_into = gr.Textbox(
                                value="rerank-best",
                                label="into folder" + (" (relative: under the output folder)" if local_paths
                                                       else " under the output folder"),
                                elem_id="rerank-into",
                            )
                        rr_keep = gr.Button("Copy the best K", elem_id="rerank-keep")
                        rr_kept = gr.Markdown("", elem_id="rerank-kept")
            with gr.Tab("PNG info", id="png-info"):
                png_file = gr.File(label="PNG made by sd-app or AUTOMATIC1111", file_types=[".png"])
                png_text = gr.Textbox(label="parameters", lines=5, buttons=["copy"])
                png_fields = gr.JSON(label="Parsed")
                with gr.Row():
                    send_button = gr.Button("Send to Generate", variant="primary")
                    send_png_image = gr.Button("Send to Image to image")

        prompt.change(
            handlers.count_tokens,
            prompt,
            counter,
            queue=False,
            show_progress="hidden",
            trigger_mode="always_last",
            api_name="count_tokens",
        )
        hires_inputs = [hires_on, hires_scale, hires_upscaler, hires_steps, hires_denoise]
        generate_inputs = [
            prompt, negative, sampler, steps, cfg, width, height, seed, n, rerank, *hires_inputs, clip_skip,
            scorer_text, min_score, extra_rounds, session, prune_to, prune_at, vae_decoder, hires_resize, shown,
        ]
        inspect_inputs = [prompt, negative, cfg, width, height, n, extra_texts, session]
        inspect_outputs = [tokens, shapes, step_gallery, sim_table, pca_map]
        generate_event = gr.on(
            [generate_button.click, prompt.submit],
            handlers.generate,
            generate_inputs,
            [status, previews, gallery, parameters, files],
            api_name="generate",
            concurrency_id=MODEL_GROUP,
            concurrency_limit=1,
        )
        generate_event.success(
            handlers.inspect,
            inspect_inputs,
            inspect_outputs,
            api_name=False,
            concurrency_id=MODEL_GROUP,
            show_progress="hidden",
        )
        image_inputs = [
            editor, mask_upload, i_prompt, i_negative, i_sampler, i_steps, i_cfg, i_width, i_height, i_seed, i_n,
            i_rerank, strength, mask_blur, masked_content, inpaint_area, padding, mask_mode, resize_mode, outpaint,
            sides, i_vae_decoder, image_session, shown,
        ]
        image_event = gr.on(
            [i_generate.click, i_prompt.submit],
            handlers.image_to_image,
            image_inputs,
            [i_status, i_previews, i_gallery, i_parameters, i_files],
            api_name="img2img",
            concurrency_id=MODEL_GROUP,
            concurrency_limit=1,
            validator=refuse_unreadable,  # an upload that is no image: one line under it, the results kept
        )
        # After each run the page's selection follows a switch made elsewhere (another page, the HTTP API): after a
        # success and after a failure (a refused run's included) or a cancel. (Gradio 6.31's page runs a ``.then``
        # only after a success or a cancel, not after an error, so each of the two gets its own listener.)
        selection = [checkpoint, vae, clip_skip, vae_decoder, i_vae_decoder, shown]
        for event in (generate_event, image_event):
            for after in (event.success, event.failure):
                after(handlers.follow_server, [shown, clip_skip, vae_decoder, i_vae_decoder], selection, queue=False,
                      api_name=False, show_progress="hidden")
        for event, view_session, view_status, view_previews in ((generate_event, session, status, previews),
                                                                (image_event, image_session, i_status, i_previews)):
            event.failure(handlers.after_cancel, view_session, [view_status, view_previews], concurrency_limit=None,
                          api_name=False, show_progress="hidden")
        outpaint.change(handlers.outpaint_content, [outpaint, masked_content], masked_content, queue=False,
                        api_name=False)
        # Interrupt and Skip keep what the view's job made; Cancel keeps nothing and also drops the view's job from
        # the queue when it has not started (Gradio's cancels, which would also close a running job's stream)
        # Each button says when the view's job still waits in the queue; Cancel's click closes the job's stream, so
        # the view's last line comes after it (the page runs a run event's failure listeners after a cancel too)
        image_interrupt, image_skip, image_cancel = handlers.stop_buttons("img2img")
        i_interrupt.click(image_interrupt, image_session, i_status, concurrency_limit=None, api_name=False)
        i_skip.click(image_skip, image_session, i_status, concurrency_limit=None, api_name=False)
        i_cancel.click(image_cancel, image_session, i_status, concurrency_limit=None, api_name=False,
                       cancels=[image_event])
        i_gallery.select(handlers.select_candidate, image_session, i_parameters, queue=False, api_name=False)
        send_result.click(
            handlers.send_result_to_image,
            session,
            [editor, i_prompt, i_negative, i_sampler, i_steps, i_cfg, i_seed, tabs],
            api_name=False,
        )
        send_png_image.click(
            lambda file, text: handlers.send_png_to_image(file, text, engine.library()),
            [png_file, png_text],
            [editor, i_prompt, i_negative, i_sampler, i_steps, i_cfg, i_seed, strength, mask_blur, masked_content,
             inpaint_area, padding, mask_mode, resize_mode, i_vae_decoder, tabs],
            api_name=False,
        )
        generate_interrupt, generate_skip, generate_cancel = handlers.stop_buttons("generate")
        interrupt_button.click(generate_interrupt, session, status, concurrency_limit=None, api_name="interrupt")
        skip_button.click(generate_skip, session, status, concurrency_limit=None, api_name="skip")
        cancel_button.click(generate_cancel, session, status, concurrency_limit=None, api_name="cancel",
                            cancels=[generate_event])
        reuse.click(handlers.reuse_seed, session, seed, queue=False, api_name=False)
        gallery.select(handlers.select_candidate, session, parameters, queue=False, api_name=False)
        inspect_button.click(
            handlers.inspect, inspect_inputs, inspect_outputs, api_name="inspect", concurrency_id=MODEL_GROUP
        )
        score_button.click(
            handlers.score, [score_files, score_texts], score_table, api_name="score", concurrency_id=MODEL_GROUP
        )
        rr_button.click(
            rerank_view.rerank, [rr_files, rr_folder, rr_prompt, rr_scorers, rr_weights, session],
            [rr_status, rr_table, rr_gallery, rr_csv], api_name="rerank", concurrency_id=MODEL_GROUP,
        )
        rr_keep.click(rerank_view.keep, [rr_k, rr_into, session], rr_kept, api_name="rerank_keep")
        png_file.change(handlers.png_info, png_file, [png_text, png_fields], api_name="png_info")
        gr.on([checkpoint.input, vae.input], handlers.switch_model, [checkpoint, vae],
              [status, checkpoint, vae, shown], api_name="switch_model", concurrency_id=MODEL_GROUP)
        refresh_models.click(handlers.refresh_models, None, [checkpoint, vae, network, shown],
                             api_name="refresh_models")
        add_network.click(handlers.add_network, [prompt, network, network_weight], prompt, queue=False,
                          api_name="add_network")
        send_button.click(
            lambda text: handlers.send_to_generate(text, engine.library()),
            png_text,
            [prompt, negative, sampler, steps, cfg, width, height, seed, *hires_inputs, clip_skip, vae_decoder,
             hires_resize, tabs],
            api_name=False,
        )
        # The page was built at start: each page load shows the selection as it is now
        demo.load(handlers.current_settings, None, selection, queue=False, api_name=False)
    demo.queue(default_concurrency_limit=1, max_size=max_queue)
    from functools import partial

    from sd_app.ui_admission import limit_waiting_per_client, queued_events

    handlers.waiting_in_queue = partial(queued_events, demo)

    # --max-waiting-per-client, as the API applies it (the refusal shows under the view's prompt)
    limit_waiting_per_client(demo, handlers.tracker.max_waiting_per_client,
                             {"generate": generate_inputs.index(prompt), "img2img": image_inputs.index(i_prompt)})
    return demo
