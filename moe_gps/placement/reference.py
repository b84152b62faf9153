"""A plain, loop-by-loop EPLB: the yardstick for :mod:`moe_gps.placement.eplb`.

Written for clarity, layer by layer with Python lists, following the algorithm as
DeepSeek's README describes it (see :mod:`moe_gps.placement.eplb`). Tests check that
the vectorised planner gives the same ``phy2log``; the benchmark times both.
"""

from __future__ import annotations

from typing import Sequence


def replicate_layer(load: Sequence[float], num_slots: int) -> tuple[list[int], list[int]]:
    """-> (expert of each slot, replicas per expert); extra slots go to the highest load per replica."""
    n = len(load)
    slots = list(range(n))
    count = [1] * n
    for _ in range(n, num_slots):
        best = 0
        for e in range(1, n):
            if load[e] / count[e] > load[best] / count[best]:
                best = e
        slots.append(best)
        count[best] += 1
    return slots, count


def pack_layer(weight: Sequence[float], num_packs: int) -> tuple[list[int], list[int]]:
    """-> (pack of each item, position in its pack); heaviest first onto the lightest pack with room."""
    n = len(weight)
    per_pack = n // num_packs
    if per_pack == 1:
        return list(range(n)), [0] * n
    order = sorted(range(n), key=lambda i: -weight[i])            # stable: ties keep index order
    level = [0.0] * num_packs
    filled = [0] * num_packs
    pack_of, pos_of = [0] * n, [0] * n
    for item in order:
        best = -1
        for p in range(num_packs):
            if filled[p] < per_pack and (best < 0 or level[p] < level[best]):
                best = p
        pack_of[item], pos_of[item] = best, filled[best]
        filled[best] += 1
        level[best] += weight[item]
    return pack_of, pos_of


def eplb_layer(load: Sequence[float], num_slots: int, num_gpus: int, num_nodes: int = 1,
               num_groups: int = 1) -> list[int]:
    """phy2log of one layer (hierarchical when num_nodes > 1 and groups divide over nodes)."""
    E = len(load)
    if not (num_nodes > 1 and num_groups % num_nodes == 0):
        num_nodes, num_groups = 1, 1
    group_size = E // num_groups
    groups_per_node = num_groups // num_nodes
    slots_per_node = num_slots // num_nodes
    gpus_per_node = num_gpus // num_nodes
    slots_per_gpu = num_slots // num_gpus

    group_load = [sum(load[g * group_size:(g + 1) * group_size]) for g in range(num_groups)]
    group_node, group_pos = pack_layer(group_load, num_nodes)
    node_experts: list[list[int]] = [[] for _ in range(num_nodes)]
    for node in range(num_nodes):
        for pos in range(groups_per_node):
            g = next(g for g in range(num_groups) if group_node[g] == node and group_pos[g] == pos)
            node_experts[node] += list(range(g * group_size, (g + 1) * group_size))

    phy2log = [0] * num_slots
    for node, experts in enumerate(node_experts):
        local_load = [load[e] for e in experts]
        slot_local, count = replicate_layer(local_load, slots_per_node)
        replica_load = [local_load[x] / count[x] for x in slot_local]
        gpu, pos = pack_layer(replica_load, gpus_per_node)
        for r, x in enumerate(slot_local):
            phy2log[node * slots_per_node + gpu[r] * slots_per_gpu + pos[r]] = experts[x]
    return phy2log


def eplb_reference(loads: Sequence[Sequence[float]], num_slots: int, num_gpus: int, num_nodes: int = 1,
                   num_groups: int = 1) -> list[list[int]]:
    """phy2log [layers][slots], one layer at a time."""
    return [eplb_layer(list(map(float, row)), num_slots, num_gpus, num_nodes, num_groups) for row in loads]
