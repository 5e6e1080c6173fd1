import torch

from ringlinear.checkpoint import init_model
from ringlinear.config import preset
from ringlinear.model import IGNORE_INDEX
from ringlinear.study.recall import RecallTask, recall_accuracy


def test_recall_sequences_are_consistent():
    task = RecallTask(vocab_size=320, num_keys=32, num_values=32)
    ids, labels = task.sample(8, 5, torch.Generator().manual_seed(0))
    assert ids.numel() == 2 * 8 + 2 * 5
    pairs = dict(zip(ids[:16:2].tolist(), ids[1:16:2].tolist()))
    for j in range(5):
        qpos = 16 + 2 * j
        assert labels[qpos].item() == pairs[ids[qpos].item()] == ids[qpos + 1].item()
    assert (labels[:16] == IGNORE_INDEX).all()


def test_accuracy_of_untrained_model_is_low_and_trained_labels_scored():
    torch.manual_seed(0)
    task = RecallTask(vocab_size=320, num_keys=32, num_values=32)
    acc = recall_accuracy(init_model(preset("tiny"), seed=0), task, num_pairs=8, num_queries=4, rows=8)
    assert 0.0 <= acc < 0.5
