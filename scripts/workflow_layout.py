"""Geometry and layout of a ComfyUI (LiteGraph) canvas graph: node boxes, slot positions, how links and native
reroutes are drawn, the check that no link is drawn through a node body, and a column layout that keeps it so.

Canvas facts, from the ComfyUI frontend 1.32 that ComfyUI 0.3.75 ships (``LGraphNode``, ``LGraphCanvas``,
``Reroute``): a node's ``pos`` is the top-left corner of its body and the title bar (``NODE_TITLE_HEIGHT`` 30)
sits above it; slot rows are ``NODE_SLOT_HEIGHT`` 20 apart, the first centred 14 px (0.7 rows) below ``pos``;
input slot centres are 10 px right of the left edge and output slot centres 9 px left of the right edge (only
socket inputs take slot rows; widget inputs stay on their widgets); a widget row is 24 px and ``computeSize`` adds
14 px below the last widget. A link is drawn as cubic Bézier splines, one per stretch between its output slot,
its reroutes (``extra.reroutes``, each with the ``parentId`` of the reroute before it; the link's
``extra.linkExtensions`` entry names its last reroute) and its input slot. Control points: 0.25 × the stretch's
length to the right of an output slot and to the left of an input slot; at a reroute, along its direction, the
angle halfway between the way in (from its parent) and the mean of its ways out, at most ``Reroute.maxSplineOffset``
(80) and 0.25 × the stretch's length away (``Reroute.calculateAngle``, ``LGraphCanvas.renderLinkDirect``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

TITLE_H = 30
SLOT_H = 20
SLOT_Y = 14
SLOT_X_IN = 10
SLOT_X_OUT = 9
WIDGET_H = 24
BODY_PAD = 14
SPLINE_OFFSET = 0.25
REROUTE_MAX_OFFSET = 80.0

NODE_GAP = 50        # between a node's bottom and the next node's title in a column
COLUMN_GAP = 170     # between columns: room for a link to turn between reroutes (±57) plus CLEARANCE on each side
GROUP_PAD = 20       # group border around its nodes
GROUP_TITLE = 40     # group title bar (font size 24)
GROUP_SEP = 40       # between groups stacked in the same columns
LANE_GAP = 36        # between the lanes above the graph that carry rerouted links
CLEARANCE = 16       # the layout keeps links this far from other nodes' bodies
IMPROVE_TRIES = 12   # nodes moved down to let a routed link run direct
ROUTE_COST = 400     # layout cost of a rerouted link (a direct link costs its rise or fall in px) ...
MOVE_COST = 0.3      # ... of each px a node sits lower than it could ...
HEIGHT_COST = 0.2    # ... and of each px of the graph's height

Rect = tuple[float, float, float, float]  # x, y, width, height (canvas units)
Point = tuple[float, float]


@dataclass
class Box:
    """A node on the canvas: ``x, y`` is its ``pos`` (top-left of the body), ``height`` the body's height (the
    title bar above adds ``TITLE_H``), ``inputs`` its socket input names in slot order."""

    id: int
    width: float
    height: float
    inputs: list[str]
    x: float = 0.0
    y: float = 0.0

    def rect(self) -> Rect:
        """The drawn node, title bar included."""
        return (self.x, self.y - TITLE_H, self.width, self.height + TITLE_H)

    def input_pos(self, name: str) -> Point:
        """Centre of the socket input ``name``. Raises ``ValueError`` when the node has no such socket."""
        return (self.x + SLOT_X_IN, self.y + SLOT_Y + SLOT_H * self.inputs.index(name))

    def output_pos(self, slot: int) -> Point:
        """Centre of output ``slot``."""
        return (self.x + self.width - SLOT_X_OUT, self.y + SLOT_Y + SLOT_H * slot)


@dataclass
class Layout:
    """What :func:`lay_out` decided besides the node positions: group rectangles, native reroutes
    (``{"id", "pos", "linkIds"[, "parentId"]}``, as ``extra.reroutes`` stores them) and each rerouted link's last
    reroute (``extra.linkExtensions``)."""

    groups: list[Rect]
    reroutes: list[dict] = field(default_factory=list)
    link_parent: dict[int, int] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- drawing


def bezier(p0: Point, p1: Point, p2: Point, p3: Point, step: float = 4.0) -> list[Point]:
    """Points along a cubic Bézier curve, at most about ``step`` canvas units apart."""
    n = max(8, int(sum(math.dist(a, b) for a, b in ((p0, p1), (p1, p2), (p2, p3))) / step))
    out = []
    for i in range(n + 1):
        t = i / n
        a, b, c, d = (1 - t) ** 3, 3 * t * (1 - t) ** 2, 3 * t * t * (1 - t), t ** 3
        out.append((a * p0[0] + b * p1[0] + c * p2[0] + d * p3[0], a * p0[1] + b * p1[1] + c * p2[1] + d * p3[1]))
    return out


def link_curves(links: list[dict], reroutes: list[dict], link_parent: dict) -> dict[int, list[list[Point]]]:
    """The drawn curves of each link (link id → one point list per stretch), as the module docstring describes.

    ``links`` are dicts with ``id``, ``start`` (output slot centre) and ``end`` (input slot centre); ``reroutes``
    and ``link_parent`` as :class:`Layout` holds them. Raises ``KeyError`` for a reroute id that is not listed.
    """
    by_id = {r["id"]: r for r in reroutes}
    chains = {}
    for link in links:
        chain, rid = [], link_parent.get(link["id"])
        while rid is not None:
            chain.insert(0, rid)
            rid = by_id[rid].get("parentId")
        chains[link["id"]] = chain
    ends = {link["id"]: link for link in links}
    angle: dict[int, tuple[float, float, float]] = {}  # reroute id → (cos, sin, control offset)
    for rid, reroute in by_id.items():
        link = ends[next(iter(reroute["linkIds"]))]
        parent = by_id[reroute["parentId"]]["pos"] if reroute.get("parentId") is not None else link["start"]
        outs = []
        for lid in reroute["linkIds"]:
            chain = chains[lid]
            i = chain.index(rid)
            nxt = by_id[chain[i + 1]]["pos"] if i + 1 < len(chain) else ends[lid]["end"]
            outs.append(math.atan2(nxt[1] - reroute["pos"][1], nxt[0] - reroute["pos"][0]))
        p = math.atan2(reroute["pos"][1] - parent[1], reroute["pos"][0] - parent[0])
        m = (p - sum(outs) / len(outs)) / 2
        if abs(m) > math.pi / 2:
            m += math.pi
        angle[rid] = (math.cos(p - m), math.sin(p - m),
                      min(REROUTE_MAX_OFFSET, math.dist(parent, reroute["pos"]) * SPLINE_OFFSET))
    curves = {}
    for link in links:
        points = [tuple(link["start"])] + [tuple(by_id[r]["pos"]) for r in chains[link["id"]]] + [tuple(link["end"])]
        stretches, start_control = [], None
        for i in range(len(points) - 1):
            a, b = points[i], points[i + 1]
            length = math.dist(a, b)
            p1 = (a[0] + length * SPLINE_OFFSET, a[1]) if start_control is None else \
                (a[0] + start_control[0], a[1] + start_control[1])
            if i + 1 < len(points) - 1:
                cos, sin, offset = angle[chains[link["id"]][i]]
                p2 = (b[0] - offset * cos, b[1] - offset * sin)
                reach = min(REROUTE_MAX_OFFSET, math.dist(b, points[i + 2]) * SPLINE_OFFSET)
                start_control = (reach * cos, reach * sin)
            else:
                p2 = (b[0] - length * SPLINE_OFFSET, b[1])
            stretches.append(bezier(a, p1, p2, b))
        curves[link["id"]] = stretches
    return curves


def _inside(p: Point, r: Rect, margin: float) -> bool:
    return r[0] - margin < p[0] < r[0] + r[2] + margin and r[1] - margin < p[1] < r[1] + r[3] + margin


def link_crossings(rects: dict, links: list[dict], reroutes: list[dict] = (), link_parent: dict | None = None,
                   clearance: float = 0.0) -> list[tuple]:
    """The (link id, node id) pairs where a drawn link passes through, or within ``clearance`` of, the body of a
    node that is neither its origin nor its target.

    ``rects`` maps node ids to drawn rectangles ``(x, y, w, h)`` (title bar included); each link is a dict with
    ``id``, ``origin``, ``target`` (node ids), ``start`` (output slot centre) and ``end`` (input slot centre);
    ``reroutes`` and ``link_parent`` as :class:`Layout` holds them.
    """
    curves = link_curves(links, list(reroutes), link_parent or {})
    found = []
    for link in links:
        points = [p for stretch in curves[link["id"]] for p in stretch]
        for nid, rect in rects.items():
            if nid not in (link["origin"], link["target"]) and any(_inside(p, rect, clearance) for p in points):
                found.append((link["id"], nid))
    return found


def group_rect(boxes: list[Box]) -> Rect:
    """The bounding rectangle of a group around ``boxes``: ``GROUP_PAD`` on each side, ``GROUP_TITLE`` on top."""
    rects = [b.rect() for b in boxes]
    x0, y0 = min(r[0] for r in rects) - GROUP_PAD, min(r[1] for r in rects) - GROUP_PAD - GROUP_TITLE
    x1, y1 = max(r[0] + r[2] for r in rects) + GROUP_PAD, max(r[1] + r[3] for r in rects) + GROUP_PAD
    return (x0, y0, x1 - x0, y1 - y0)


# ----------------------------------------------------------------------------------------------- layout


def lay_out(boxes: dict[int, Box], columns: list[list[int]], groups: list[list[int]], edges: list[tuple],
            *, top: float = 0.0, max_rounds: int = 50) -> Layout:
    """Place ``boxes`` in ``columns`` (left to right, node ids top to bottom), route the links that would cross a
    node through reroutes, and return the groups and reroutes.

    ``edges`` are ``(link id, origin id, origin slot, target id, target input name)``; every origin must sit in a
    column left of its target. ``groups`` are lists of node ids; where two groups share columns the earlier one
    is placed above. Column by column, each node takes the cheapest of these places: right below the node above
    it, or level with one of the slots that feed it (a straight link). A place costs ``ROUTE_COST`` per link into
    the node that would pass within ``CLEARANCE`` of a node placed so far, the rise or fall of the other links
    (double over more than one column) and ``MOVE_COST`` per px below the highest place. Groups that overlap an
    earlier group move down. Then, up to ``IMPROVE_TRIES`` times, a node in the way of a link is moved below it
    and the placement redone, kept when the whole graph gets cheaper (``HEIGHT_COST`` per px of height counts
    too). A link that still passes a node is routed like a bus: from its output across the gap to a lane above
    all groups, along the lane, and down the gap before its target's column (reroutes at the turns, shared by the
    links of one output).

    Raises ``ValueError`` when a link runs backwards or a node is not in exactly one column, ``RuntimeError``
    when the groups do not settle within ``max_rounds`` or a routed link still crosses a node.
    """
    column_of = {nid: c for c, col in enumerate(columns) for nid in col}
    if set(column_of) != set(boxes) or sum(map(len, columns)) != len(boxes):
        raise ValueError(f"every node must be in exactly one column: {columns} for nodes {sorted(boxes)}")
    for link_id, src, _, dst, _ in edges:
        if column_of[src] >= column_of[dst]:
            raise ValueError(f"link {link_id} runs from column {column_of[src]} back to column {column_of[dst]}")
    min_y = {nid: math.ceil(top + GROUP_TITLE + GROUP_PAD + TITLE_H) for nid in boxes}
    best = _place(boxes, columns, groups, edges, min_y, max_rounds)
    tried = set()
    for _ in range(IMPROVE_TRIES):  # move a node below a routed link when the whole layout gets cheaper
        moves = [(e, n) for e in best[1] for n in _crossed(boxes, [e], list(boxes), best[0]) if (e[0], n) not in tried]
        if not moves:
            break
        edge, nid = moves[0]
        tried.add((edge[0], nid))
        trial = dict(best[2])
        trial[nid] = max(trial[nid], math.ceil(_below_link(boxes, edge, nid, best[2])))
        candidate = _place(boxes, columns, groups, edges, trial, max_rounds)
        if candidate[3] < best[3]:
            best = candidate
    positions, routed = best[:2]
    for nid, (x, y) in positions.items():
        boxes[nid].x, boxes[nid].y = x, y
    layout = Layout([group_rect([boxes[n] for n in ids]) for ids in groups])
    _route(boxes, columns, routed, layout)
    links = [_link(boxes, e) for e in edges]
    crossings = link_crossings({n: b.rect() for n, b in boxes.items()}, links, layout.reroutes, layout.link_parent,
                               clearance=CLEARANCE / 2)
    if crossings:
        raise RuntimeError(f"links still drawn through nodes (link, node): {crossings}")
    return layout


def _place(boxes: dict[int, Box], columns: list[list[int]], groups: list[list[int]], edges: list[tuple],
           min_y: dict[int, int], max_rounds: int):
    """One placement from the lower bounds ``min_y`` (raised where groups overlap): (positions, the edges whose
    direct link crosses a node, the final lower bounds, the layout's cost)."""
    column_of = {nid: c for c, col in enumerate(columns) for nid in col}
    incoming = {nid: [e for e in edges if e[3] == nid] for nid in boxes}
    min_y = dict(min_y)
    xs, x = [], 0.0
    for col in columns:
        xs.append(x)
        x += max(boxes[n].width for n in col) + COLUMN_GAP
    for _ in range(max_rounds):
        placed: list[int] = []
        for c, col in enumerate(columns):
            below = None
            for nid in col:
                box = boxes[nid]
                box.x = xs[c]
                y0 = min_y[nid] if below is None else max(min_y[nid], math.ceil(below + NODE_GAP + TITLE_H))
                level = [boxes[src].output_pos(slot)[1] - SLOT_Y - SLOT_H * box.inputs.index(name)
                         for _, src, slot, _, name in incoming[nid]]
                costs = []
                for y in [y0, *sorted({v for v in level if v > y0})]:
                    box.y = y
                    costs.append((_links_cost(boxes, incoming[nid], placed, column_of) + MOVE_COST * (y - y0), y))
                box.y = min(costs)[1]
                placed.append(nid)
                below = box.y + box.height
        bumps = _group_bumps(boxes, groups)
        if not bumps:
            break
        for nid, y in bumps:
            min_y[nid] = max(min_y[nid], math.ceil(y))
    else:
        raise RuntimeError(f"the groups did not settle in {max_rounds} rounds")
    routed = [e for e in edges if _crossed(boxes, [e], list(boxes))]
    bottom = max(b.y + b.height for b in boxes.values())
    cost = _links_cost(boxes, edges, list(boxes), column_of) + HEIGHT_COST * bottom
    return {n: (b.x, b.y) for n, b in boxes.items()}, routed, min_y, cost


def _links_cost(boxes: dict[int, Box], edges: list[tuple], among: list[int], column_of: dict) -> float:
    """How hard ``edges`` are to read: ``ROUTE_COST`` for each that must be rerouted (its direct link passes a node
    of ``among``), else its rise or fall, counted twice over more than one column."""
    cost = 0.0
    for edge in edges:
        if _crossed(boxes, [edge], among):
            cost += ROUTE_COST
        else:
            link = _link(boxes, edge)
            cost += abs(link["end"][1] - link["start"][1]) * (1 if column_of[edge[3]] - column_of[edge[1]] == 1 else 2)
    return cost


def _below_link(boxes: dict[int, Box], edge: tuple, nid: int, min_y: dict) -> float:
    """The ``y`` of node ``nid`` that puts its title ``CLEARANCE`` below the direct link of ``edge``."""
    link = _link(boxes, edge)
    rx, _, rw, _ = boxes[nid].rect()
    points = [p for stretch in link_curves([link], [], {})[link["id"]] for p in stretch]
    near = [p[1] for p in points if rx - CLEARANCE < p[0] < rx + rw + CLEARANCE]
    return max(near, default=min_y[nid]) + CLEARANCE + TITLE_H + 1


def _link(boxes: dict[int, Box], edge: tuple) -> dict:
    link_id, src, slot, dst, name = edge
    return {"id": link_id, "origin": src, "target": dst, "start": boxes[src].output_pos(slot),
            "end": boxes[dst].input_pos(name)}


def _crossed(boxes: dict[int, Box], edges: list[tuple], among: list[int], positions: dict | None = None) -> list:
    """The nodes of ``among`` that a direct link of ``edges`` passes within ``CLEARANCE`` of (with the boxes at
    ``positions`` when given)."""
    if positions is not None:
        for nid, (x, y) in positions.items():
            boxes[nid].x, boxes[nid].y = x, y
    rects = {n: boxes[n].rect() for n in among}
    return [n for _, n in link_crossings(rects, [_link(boxes, e) for e in edges], clearance=CLEARANCE)]


def _overlap(a0: float, a1: float, b0: float, b1: float) -> bool:
    return a0 < b1 and b0 < a1


def _group_bumps(boxes: dict[int, Box], groups: list[list[int]]) -> list[tuple[int, float]]:
    """For each node of a group that overlaps an earlier group sharing its columns: the ``y`` that puts it
    below that group."""
    rects = [group_rect([boxes[n] for n in ids]) for ids in groups]
    bumps = []
    for j, later in enumerate(rects):
        for earlier in rects[:j]:
            if not _overlap(earlier[0], earlier[0] + earlier[2], later[0], later[0] + later[2]):
                continue
            floor = earlier[1] + earlier[3] + GROUP_SEP
            if later[1] < floor:
                need = floor + GROUP_TITLE + GROUP_PAD + TITLE_H
                bumps += [(n, need) for n in groups[j] if boxes[n].y < need]
    return bumps


def _route(boxes: dict[int, Box], columns: list[list[int]], edges: list[tuple], layout: Layout) -> None:
    """Add the reroutes that carry ``edges`` along lanes above the graph (one lane per output)."""
    column_x = {n: boxes[col[0]].x for col in columns for n in col}
    tops = [r[1] for r in layout.groups] + [b.rect()[1] for b in boxes.values()]
    lane_y = min(tops) - LANE_GAP
    by_output: dict[tuple[int, int], list[tuple]] = {}
    for edge in edges:
        by_output.setdefault((edge[1], edge[2]), []).append(edge)
    next_id = 1

    def add(pos: Point, parent: int | None, link_ids: list[int]) -> int:
        nonlocal next_id
        reroute = {"id": next_id, "pos": [round(pos[0], 1), round(pos[1], 1)], "linkIds": link_ids}
        if parent is not None:
            reroute["parentId"] = parent
        layout.reroutes.append(reroute)
        next_id += 1
        return reroute["id"]

    for (src, slot), group in sorted(by_output.items(), key=lambda kv: column_x[kv[0][0]]):
        gap_after = column_x[src] + boxes[src].width + COLUMN_GAP / 2
        start_y = boxes[src].output_pos(slot)[1]
        group.sort(key=lambda e: column_x[e[3]])
        ids = [e[0] for e in group]
        turn = add((gap_after, lane_y), add((gap_after, start_y), None, ids), ids)
        for x in sorted({column_x[e[3]] for e in group}):
            here = [e for e in group if column_x[e[3]] == x]
            ids = [e[0] for e in group if column_x[e[3]] >= x]
            turn = add((x - COLUMN_GAP / 2, lane_y), turn, ids)
            for edge in here:
                end_y = boxes[edge[3]].input_pos(edge[4])[1]
                layout.link_parent[edge[0]] = add((x - COLUMN_GAP / 2, end_y), turn, [edge[0]])
        lane_y -= LANE_GAP
