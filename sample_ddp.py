"""Many images for FID, upstream sample_ddp.py's job, run by sample.py.

    torchrun --nnodes=1 --nproc_per_node=G sample_ddp.py ODE|SDE --ckpt PATH [flags]

is `sample.py ... --num-fid-samples 50000 --vae ema --run-folder` (cfg scale 1 unless given; --vae
the checkpoint's latent space where it records one): as
upstream's, numbered PNGs in a folder under --sample-dir named by the settings (e.g.
samples/SiT-XL-2-pretrained-cfg-1.5-32-ODE-250-dopri5/), resumable, and beside it one .npz of
exactly --num-fid-samples images in ADM's format. Upstream's defaults but one: the per-process
batch is 32, not 4 (the 32 is in the folder name; --per-proc-batch-size 4 gives upstream's).
Every flag of sample.py's FID job is accepted (`python sample_ddp.py ODE --help` lists them; not
--likelihood, --reverse, --data, --dataset, --exact-divergence or --class-labels); see the docstring
of sample.py.
"""
from sit_fast.errors import quiet_ctrl_c_while_loading

quiet_ctrl_c_while_loading(__name__)  # a Ctrl-C while the libraries load (seconds) ends it, quietly

from sample import SAMPLE_DDP_DEFAULTS, main

if __name__ == "__main__":
    main(defaults=SAMPLE_DDP_DEFAULTS, prog="sample_ddp.py")
