"""Trained weights at inference: a request's (or the model's own) trained tar and LoRAs, applied for one request and
taken out again, so nothing is left behind. One job per module:

  request.py          what a request can bring (AdapterRequest, parse_loras), checked before anything is fetched
  trained_tar.py      an extracted trained_model.tar: its parts, and its tokens checked against this model
  unet_swap.py        a full fine-tune copied into the base UNet and the base restored from a CPU snapshot
  tokens.py           trained tokens in and out of both text encoders; the prompt rewriter
  lora_store.py       resident LoRAs, switched per request: peft adapters, or the compiled UNet's slots
  lora_undo.py        a LoRA load that failed half-way taken back out
  trained_weights.py  TrainedWeights: the steps of applying a request's weights, and the model's own weights

All of it is plain synchronous code: the edge runs it on the compute thread (sdxl/model/compute.py) with generation.
"""
