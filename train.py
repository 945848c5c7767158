"""Train SiT (Scalable Interpolant Transformers, arXiv 2401.08740) with PyTorch DDP.

Upstream SiT's flags keep working; see `python train.py --help` for all of them.

    # one machine, 8 GPUs (nccl), ImageNet through the VAE, bf16 autocast:
    torchrun --nproc_per_node=8 train.py --model SiT-XL/2 --data-path /data/imagenet/train

    # the same from a latent cache (no VAE in the loop; python -m sit_fast.latent_cache builds it):
    torchrun --nproc_per_node=8 train.py --model SiT-XL/2 --latent-cache /data/in256-latents

    # several machines: run this on every node (torchrun's standard c10d rendezvous), 2 nodes x 8 GPUs:
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_id=sit --rdzv_backend=c10d \\
        --rdzv_endpoint=HOST_OF_NODE_0:29500 train.py --model SiT-XL/2 --latent-cache /shared/in256-latents

    # CPU, one process or several (gloo), pixel space on scikit-learn's bundled digits:
    torchrun --nproc_per_node=2 train.py --dataset digits --image-size 8 --vae none --model SiT-T/2 ...

    # continue the newest matching run exactly (model, EMA, optimizer, data order, RNG):
    torchrun --nproc_per_node=8 train.py --model SiT-XL/2 --latent-cache ... --resume auto

Checkpoints go to EXP_DIR/checkpoints/NNNNNNN.pt (written atomically; see
sit_fast/training/checkpointing.py for the format), the log to EXP_DIR/log.txt and EMA sample grids
to EXP_DIR/samples/. With several nodes, EXP_DIR must be on a filesystem that all of them share.
"""
from sit_fast.errors import cli_entry, quiet_ctrl_c_while_loading

quiet_ctrl_c_while_loading(__name__)  # a Ctrl-C while the libraries load (seconds) ends it, quietly

from sit_fast.training.loop import main

if __name__ == "__main__":
    cli_entry(main)()
