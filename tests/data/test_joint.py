"""compacter_jax.data.joint: a multi-task step holds each active task's single-run batch, with
`task_ids`; packed, every row holds one task and every step of the run fits the plan's shapes.
(The end-to-end version through experiments.multitask is tests/experiments/test_multitask.py.)"""

from __future__ import annotations

import numpy as np

from compacter_jax import data as data_lib
from compacter_jax.data import joint
from compacter_jax.peft import bank


def encoded(task: str, n: int, target_width: int, seed: int) -> data_lib.EncodedData:
    rs = np.random.RandomState(seed)
    src, tgt = rs.randint(1, 9, n), rs.randint(1, target_width + 1, n)
    mask = (np.arange(8)[None] < src[:, None]).astype(np.int32)
    dmask = (np.arange(target_width)[None] < tgt[:, None]).astype(np.int32)
    return data_lib.EncodedData(data_lib.get_task(task),
                                rs.randint(2, 50, (n, 8)).astype(np.int32) * mask, mask,
                                rs.randint(2, 50, (n, target_width)).astype(np.int32) * dmask,
                                dmask, (0,) * n, (None,) * n, 0, 0)


def test_the_task_key_is_the_one_the_bank_reads():
    assert joint.TASK_IDS == bank.TASK_IDS


def test_padded_steps_keep_their_shape_and_resume_from_positions():
    trains = [encoded("rte", 10, 3, 0), encoded("cola", 6, 4, 1)]
    stream = joint.joint_train_batches(trains, [2, 4], 4, seed=3, target_width=4)
    steps = [next(stream) for _ in range(4)]
    for step, (positions, batch) in enumerate(steps, 1):
        assert batch["input_ids"].shape == (8, 8) and batch["labels"].shape == (8, 4)
        np.testing.assert_array_equal(batch[joint.TASK_IDS], [0] * 4 + [1] * 4)
        if step > 2:  # task 0 has finished: empty rows, its position stays at its step 2
            assert batch["attention_mask"][:4].sum() == 0 and positions[0] == steps[1][0][0]
    # Resumed after step 2 from the recorded positions: the same steps 3 and 4.
    resumed = joint.joint_train_batches(trains, [2, 4], 4, seed=3, target_width=4,
                                        positions=steps[1][0], start_step=2)
    for want_positions, want in steps[2:]:
        positions, batch = next(resumed)
        assert positions == want_positions
        for key in want:
            np.testing.assert_array_equal(batch[key], want[key])


def test_the_packing_plan_fits_every_step_with_one_task_per_row():
    trains = [encoded("rte", 12, 3, 0), encoded("cola", 9, 4, 1)]
    totals = [3, 5]
    task_plans = [data_lib.plan_packing(t, 4, seed=3, num_epochs=2) for t in trains]
    plan = joint.joint_packing_plan(trains, totals, 4, seed=3, task_plans=task_plans)
    stream = joint.joint_train_batches(trains, totals, 4, seed=3, target_width=4, plan=plan)
    single = [[len(b["input_ids"]) for b, _ in data_lib.train_batches(t, 4, seed=3,
                                                                       num_epochs=2)]
              for t in trains]
    for step in range(1, 6):
        _, packed = next(stream)
        assert len(packed["input_ids"]) in plan.row_buckets
        for row, segments in zip(packed[joint.TASK_IDS], packed["encoder_segment_ids"]):
            assert row in ((0, 1) if step <= 3 else (1,)) or not segments.any()
        examples = data_lib.unpack_batch(packed)
        want = sum(rows[step - 1] for rows, total in zip(single, totals) if step <= total)
        assert len(examples) == want  # every real example of the active tasks, once
