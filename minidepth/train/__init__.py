"""LoRA fine-tuning of the depth-conditioned UNet (and optionally the text encoder), on one process or under torchrun.

    minidepth train-lora --model weights/stable-diffusion-2-depth --data photos/ --out style.safetensors --steps 500
    torchrun --nproc_per_node=4 -m minidepth train-lora ...           # the same LoRA, four GPUs

    from minidepth.train import train_lora
    result = train_lora(model="weights/stable-diffusion-2-depth", data="photos/", out="style.safetensors", steps=500)

One training step (Ho et al. 2020, "DDPM", algorithm 1, in the latent space of Rombach et al. 2022, with the depth
channel of SD2-depth):

    x0    = vae.encode(photo).sample() × scaling_factor                 posterior sample (Kingma & Welling 2014, eq. 10)
    t     ~ U{0, ..., T-1},   eps ~ N(0, I)
    x_t   = sqrt(a_bar_t) x0 + sqrt(1 - a_bar_t) eps                   add_noise (DDPM eq. 4)
    pred  = unet(concat[x_t, depth channel], t, text(caption))          the depth channel exactly as the pipeline makes it
    loss  = w_t · mean (pred - target)^2,  target = eps, or v = sqrt(a_bar_t) eps - sqrt(1 - a_bar_t) x0
            (Salimans & Ho 2022, sec. 4), w_t = 1 or min-SNR (Hang et al. 2023)

Files: `config.py` (the settings and their checks; no torch; the command line is cli/train.py), `data.py` (the folder, captions,
depth maps, crops), `objective.py` (LoRA layers to train, the random draws, the loss), `loop.py` (optimisation,
DistributedDataParallel), `state.py` (checkpoints, resume, the LoRA file, the CSV log, the loss curve).
"""

from .config import TrainConfig, TrainError  # noqa: F401  (torch-free)


def train_lora(config=None, **kwargs):
    """Train a LoRA; keyword arguments are the fields of `TrainConfig` (or pass a TrainConfig). Returns a
    `loop.TrainResult` (the output path, the loss of every step, ...). See `loop.train_lora`."""
    from .loop import train_lora as run
    return run(config, **kwargs)
