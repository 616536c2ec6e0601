"""Run under torchrun by tests/test_distributed.py: one process's half of a distributed computation.

    torchrun --standalone --nproc_per_node 2 tests/distributed_worker.py CASE INPUT.pt OUTPUT_DIR

Each case reads its inputs (made by the test), does its rank's share with flexi_jest.distributed and
writes what it computed to OUTPUT_DIR/rank<r>.pt, for the test to compare with one process.
"""

import sys

import torch

from flexi_jest.distributed import broadcast_object, gather_rows, gather_rows_with_grad, init_world, shard, shutdown
from flexi_jest.losses import sigmoid_loss
from flexi_jest.selection import joint_select_from_embeddings


def selection(inputs: dict, world) -> dict:
    """Each rank holds its shard of the learner's scoring embeddings; gather them, select with the shared seed."""
    rows = shard(inputs["learner"][0].shape[0], world)
    image_emb, text_emb, scale, bias = inputs["learner"]
    learner = (gather_rows(image_emb[rows], world), gather_rows(text_emb[rows], world), scale, bias)
    generator = torch.Generator().manual_seed(inputs["seed"])
    chosen = joint_select_from_embeddings("learnability", learner, inputs["reference"], inputs["n_select"],
                                          inputs["n_chunks"], generator)
    # rank 0 alone writes the model; every rank's result carries its digest
    return {"chosen": chosen, "digest": broadcast_object(f"sha-of-rank-{world.rank}", world)}


def loss(inputs: dict, world) -> dict:
    """This rank's images against every rank's texts; gradients flow back to the rank owning each row."""
    rows = shard(inputs["image"].shape[0], world)
    image = inputs["image"][rows].clone().requires_grad_()
    text = inputs["text"][rows].clone().requires_grad_()
    scale, bias = (inputs["scale"].clone().requires_grad_(), inputs["bias"].clone().requires_grad_())
    share = sigmoid_loss(image, gather_rows_with_grad(text, world), scale, bias, inputs["chunk"],
                         row_offset=rows.start, normalizer=inputs["image"].shape[0])
    share.backward()
    return {"share": share.detach(), "image_grad": image.grad, "text_grad": text.grad,
            "scale_grad": scale.grad, "bias_grad": bias.grad}


def ddp_step(inputs: dict, world) -> dict:
    """One DDP backward of the training loss (mixed patch sizes) on the rank's share of a batch."""
    from flexi_jest.losses import multi_patch_loss
    from flexi_jest.models import DualEncoder
    model = DualEncoder(inputs["model_config"])
    model.load_state_dict(inputs["state_dict"])
    net = torch.nn.parallel.DistributedDataParallel(model)
    batch = inputs["images"].shape[0]
    rows = shard(batch, world)
    share = multi_patch_loss(model, inputs["images"][rows], inputs["tokens"][rows], inputs["patch_sizes"], None,
                             world, batch, net)
    (share * world.size).backward()
    return {"share": share.detach(), "grads": {n: p.grad for n, p in model.named_parameters()}}


def stream_share(inputs: dict, world) -> dict:
    """This rank reads and decodes only its rows of each super-batch, then receives its rows of the selection."""
    from flexi_jest.data import loader as loader_module
    from flexi_jest.distributed import exchange_rows
    decoded = []  # every sample key this process decodes (workers=0: decoding runs here)

    def counting_decode(raw, *args):
        decoded.append(raw["__key__"])
        return decode_sample(raw, *args)

    decode_sample, loader_module.decode_sample = loader_module.decode_sample, counting_decode
    loader = loader_module.StreamLoader(inputs["pool"], inputs["batch"], streams=4, mode="epoch", seed=5, image_size=8,
                                        rank=world.rank, world=world.size, workers=inputs["workers"])
    keys, received, held = [], [], []
    for chosen in inputs["chosen"]:
        mine = loader.next_batch()
        images = torch.stack([s["image"] for s in mine])  # uint8 [B / world, 3, 8, 8]: all this rank holds
        held.append((images.shape, images.dtype))
        keys.append([s["key"] for s in mine])
        received.append(exchange_rows(images, chosen, world))
    loader.close()
    return {"keys": keys, "received": received, "held": held, "decoded": decoded}


if __name__ == "__main__":
    case, input_path, output_dir = sys.argv[1:4]
    world, _ = init_world("cpu")
    inputs = torch.load(input_path, weights_only=False)
    outputs = {"selection": selection, "loss": loss, "ddp_step": ddp_step,
               "stream_share": stream_share}[case](inputs, world)
    torch.save({"world_size": world.size, **outputs}, f"{output_dir}/rank{world.rank}.pt")
    # every rank done with its collectives before any tears the group down (a rank leaving gloo early aborted
    # its peer at exit now and then: "terminate called without an active exception")
    shutdown(barrier=True)
