"""The paper's AnyStory on UNet pipelines (SD 1.5, SDXL, the embedded default model).

    qformer.py        the subject QFormer and the routing QFormer (Perceiver-resampler blocks)
    reference_net.py  the lightweight ReferenceNet: the UNet without cross-attention, run at t = 0
    router.py         the decoupled instance-aware router and its routing loss
    attention.py      the attention processors: routing-guided cross- and self-attention
    adapter.py        the trainable parts together, installed on a UNet
    weights.py        adapter files and character encodings (safetensors)
    pipeline.py       AnyStoryPipeline (AnyStorySDPipeline, AnyStoryXLPipeline: diffusers pipelines):
                      encode characters once, draw panels with them
    figures.py        the references pasted into their places at one step
    guidance.py       classifier-free guidance inside a noise interval
"""
