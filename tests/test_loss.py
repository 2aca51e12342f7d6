import torch
import torch.nn.functional as F

import regate_plugin as rg
from regate_plugin.core import IGNORE_INDEX, next_token_loss

from .tiny import make_batch, tiny_llava


def test_chunked_loss_equals_one_piece_and_honours_num_items():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 9, 8, generator=gen, requires_grad=True)
    head = torch.nn.Linear(8, 50)
    targets = torch.randint(0, 50, (2, 9), generator=gen)
    targets[0, :3] = IGNORE_INDEX
    whole = next_token_loss(hidden, targets, head)
    (g_whole,) = torch.autograd.grad(whole.loss, hidden)
    chunked = next_token_loss(hidden, targets, head, chunk_size=4)
    (g_chunked,) = torch.autograd.grad(chunked.loss, hidden)
    torch.testing.assert_close(chunked.loss, whole.loss)
    torch.testing.assert_close(g_chunked, g_whole)
    supervised = targets != IGNORE_INDEX
    expected = F.cross_entropy(head(hidden[supervised]).float(), targets[supervised], reduction="sum") / 40
    torch.testing.assert_close(next_token_loss(hidden, targets, head, num_items_in_batch=40).loss, expected)
    assert whole.num_targets == int(supervised.sum()) and whole.per_token.shape == (whole.num_targets,)


def test_rows_without_answer_tokens_train_and_an_empty_batch_gives_zero_loss():
    batch = make_batch(batch=3, seed=6)
    batch["labels"][1] = IGNORE_INDEX  # one sample with no answer tokens
    model = tiny_llava(seed=6)
    model.train()
    rg.enable_token_elision(model, rg.build_token_elision("random", rg.ReGATEConfig(warmup_steps=0, dense_steps=0)))
    out = model(**batch)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.token_elision["kept_mask"][1].equal(batch["attention_mask"][1].bool())
    model.zero_grad()
    batch["labels"][:] = IGNORE_INDEX
    out = model(**batch)
    out.loss.backward()
    assert out.loss.item() == 0.0 and out.token_elision["candidates"] == 0
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in model.parameters())


def test_statistics_are_each_targets_log_prob_entropy_and_top1_chunked_or_not():
    gen = torch.Generator().manual_seed(3)
    head = torch.nn.Linear(8, 11, bias=False)
    hidden = torch.randn(2, 7, 8, generator=gen, requires_grad=True)
    targets = torch.randint(0, 11, (2, 7), generator=gen)
    targets[0, :3] = IGNORE_INDEX
    supervised = targets != IGNORE_INDEX
    for chunk in (0, 3):
        logp = torch.log_softmax(head(hidden).float(), -1)
        expected = logp[supervised].gather(1, targets[supervised][:, None]).squeeze(1)
        entropy = -(logp.exp() * logp).sum(-1)[supervised]
        top1 = logp.argmax(-1)[supervised] == targets[supervised]
        result = next_token_loss(hidden, targets, head, chunk_size=chunk, statistics=True)
        torch.testing.assert_close(result.log_probs, expected)
        torch.testing.assert_close(result.entropy, entropy.detach())
        assert torch.equal(result.is_top1, top1)
        (grad,) = torch.autograd.grad(result.log_probs.sum(), hidden)
        (want,) = torch.autograd.grad(expected.sum(), hidden)
        torch.testing.assert_close(grad, want)
    assert next_token_loss(hidden, targets, head).log_probs is None
