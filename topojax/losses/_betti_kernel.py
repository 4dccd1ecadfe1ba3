"""The host kernel of :mod:`topojax.losses.betti_matching`, compiled by numba.

One call, :func:`match_item`, computes the Betti matching of two images of
one shape: their barcodes, the barcode of their comparison image (the
pointwise minimum) and the two image barcodes that induce the matchings into
it, in every homology dimension of the V-construction cubical complex (the
voxels are the vertices; a cell enters the filtration at the largest value
of its vertices).

Every persistence pairing here is the pivot pairing of a boundary matrix
whose rows and columns follow a total order of the cells, and pivot pairings
do not depend on how the matrix is reduced. The order is the one of
Betti-Matching-3D (Stucki et al.), the code ``topolosses`` calls, so that
ties (a binary label has nothing else) pair the same cells: by value, then
by the cell's position in the lexicographic order of (x, y, z, type), where
an edge's type is its axis and a square's the axis normal to it. Values are
replaced by their dense ranks ("levels") first, so that sorting the cells of
a dimension is a counting sort, linear in their number.

* Dimension 0: union-find over the edges in filtration order, the elder
  rule choosing the surviving component. The image pairs come from the
  same merges, each component also remembering its oldest vertex under the
  prediction's and under the target's order.
* The top dimension (1 in 2D, 2 in 3D): union-find over the dual graph
  (top cells and one cell at infinity, joined through the cells of one
  dimension less, taken in reverse order), which pairs as the reduction of
  the anti-transposed boundary matrix does. Its merges also clear those
  cells from the dimension below, whose columns would reduce to zero.
* Dimension 1 in 3D: a column reduction of the square-to-edge boundary
  matrix with clearing and the emergent-pair shortcut (a column whose
  largest face is not yet a pivot is reduced already); reduced columns are
  stored for reuse. Image pairs reduce the comparison's columns with rows
  in an input's order (Bauer and Schmahl 2022).

Indices are int32 (positions in flat C-order arrays), so a volume may hold
up to about 7·10⁸ voxels; the peak memory is about 400 bytes per voxel
(measured at 96³; topolosses' kernel: 1.3 kB). Every function is compiled with ``nogil=True``, so
items run in parallel on threads.
"""

from __future__ import annotations

import numba
import numpy as np

_JIT = dict(nopython=True, cache=True, nogil=True)
# Kinds of cells, for _cell_levels.
_EDGES, _FACES, _TOP = 0, 1, 2


@numba.jit(**_JIT)
def _levels(values, order):
  """Dense ranks of ``values`` (equal values, equal level), their number, and
  each value's position in the stable sort (ties by flat index).

  ``order`` sorts ``values`` with ties in any order (NumPy's quicksort,
  several times faster than a stable sort): the levels do not see the
  order of ties, and a counting sort by level then orders them by index.
  """
  n = values.size
  level = np.empty(n, np.int32)
  current = -1
  for i in range(n):
    v = order[i]
    if i == 0 or values[v] != values[order[i - 1]]:
      current += 1
    level[v] = current
  num_levels = current + 1
  counts = np.zeros(num_levels + 1, np.int64)
  for v in range(n):
    counts[level[v] + 1] += 1
  for i in range(num_levels):
    counts[i + 1] += counts[i]
  rank = np.empty(n, np.int32)
  for v in range(n):
    rank[v] = counts[level[v]]
    counts[level[v]] += 1
  return level, rank, num_levels


@numba.jit(**_JIT)
def _cell_levels(level, shape, strides, nd, kind):
  """Level of every cell of one kind by its dense id, -1 where none.

  Dense ids: ``vertex * types + type`` for edges (``types = nd``, type =
  axis) and 3D faces (type = normal axis), ``vertex`` for top cells (the
  lower corner). Their order is the lexicographic order of (x, y, z, type).
  """
  sx, sy, sz = shape[0], shape[1], shape[2]
  types = 1 if kind == _TOP else (nd if kind == _EDGES else 3)
  out = np.full(sx * sy * sz * types, -1, np.int32)
  for x in range(sx):
    for y in range(sy):
      for z in range(sz):
        v = (x * sy + y) * sz + z
        c = (x, y, z)
        if kind == _TOP:
          if x + 1 < sx and y + 1 < sy and (nd == 2 or z + 1 < sz):
            m = max(max(level[v], level[v + strides[0]]),
                    max(level[v + strides[1]],
                        level[v + strides[0] + strides[1]]))
            if nd == 3:
              w = v + strides[2]
              m = max(m, max(max(level[w], level[w + strides[0]]),
                             max(level[w + strides[1]],
                                 level[w + strides[0] + strides[1]])))
            out[v] = m
        elif kind == _EDGES:
          for t in range(nd):
            if c[t] + 1 < shape[t]:
              out[v * types + t] = max(level[v], level[v + strides[t]])
        else:
          for t in range(3):
            a, b = (1, 2) if t == 0 else ((0, 2) if t == 1 else (0, 1))
            if c[a] + 1 < shape[a] and c[b] + 1 < shape[b]:
              sa, sb = strides[a], strides[b]
              out[v * 3 + t] = max(max(level[v], level[v + sa]),
                                   max(level[v + sb], level[v + sa + sb]))
  return out


@numba.jit(**_JIT)
def _sort_cells(cell_level, num_levels):
  """Counting sort by (level, dense id): the order and each cell's rank."""
  counts = np.zeros(num_levels + 1, np.int64)
  for lev in cell_level:
    if lev >= 0:
      counts[lev + 1] += 1
  for i in range(num_levels):
    counts[i + 1] += counts[i]
  order = np.empty(counts[num_levels], np.int32)
  rank = np.full(cell_level.size, -1, np.int32)
  for cell in range(cell_level.size):
    lev = cell_level[cell]
    if lev >= 0:
      position = counts[lev]
      counts[lev] = position + 1
      order[position] = cell
      rank[cell] = position
  return order, rank


@numba.jit(**_JIT)
def _find(parent, x):
  while parent[x] != x:
    parent[x] = parent[parent[x]]  # Path halving.
    x = parent[x]
  return x


@numba.jit(**_JIT)
def _edge_voxel(level, e, strides, nd):
  """The vertex of edge ``e`` whose value is the edge's (the upper one on a
  tie, as Betti-Matching-3D chooses)."""
  e = np.int64(e)
  v = e // nd
  w = v + strides[e % nd]
  return w if level[w] >= level[v] else v


@numba.jit(**_JIT)
def _wall_voxel(level, q, strides, nd):
  """The parent voxel of a cell one dimension below the top: an edge in 2D,
  a face in 3D (its corners by decreasing flat index, the first maximal)."""
  if nd == 2:
    return _edge_voxel(level, q, strides, nd)
  q = np.int64(q)
  v, t = q // 3, q % 3
  a, b = (1, 2) if t == 0 else ((0, 2) if t == 1 else (0, 1))
  corners = (v + strides[a] + strides[b], v + strides[a], v + strides[b], v)
  best = corners[0]
  for c in corners:
    if level[c] > level[best]:
      best = c
  return best


@numba.jit(**_JIT)
def _top_voxel(level, v, strides, nd):
  """The parent voxel of a top cell: in 2D the maximal corner of largest
  flat index, in 3D the one of smallest (Betti-Matching-3D's choices)."""
  v = np.int64(v)
  if nd == 2:
    corners = (v + strides[0] + strides[1], v + strides[0], v + strides[1], v)
    best = corners[0]
    for c in corners:
      if level[c] > level[best]:
        best = c
    return best
  best = v
  for dx in range(2):
    for dy in range(2):
      for dz in range(2):
        c = v + dx * strides[0] + dy * strides[1] + dz * strides[2]
        if level[c] > level[best]:
          best = c
  return best


@numba.jit(**_JIT)
def _dim0_pairs(level, rank, edge_order, edge_level, strides, nd, n):
  """Finite pairs of dimension 0: ``(births, deaths, pair_of_birth)``, the
  birth vertex and death edge of each, and each vertex's pair (or -1)."""
  parent = np.arange(n).astype(np.int32)
  births = np.empty(n, np.int32)
  deaths = np.empty(n, np.int32)
  pair_of_birth = np.full(n, -1, np.int32)
  count = 0
  for e in edge_order:
    v = e // nd
    a = _find(parent, v)
    b = _find(parent, v + strides[e % nd])
    if a != b:
      young, old = (b, a) if rank[a] < rank[b] else (a, b)
      parent[young] = old
      if level[young] != edge_level[e]:
        births[count] = young
        deaths[count] = e
        pair_of_birth[young] = count
        count += 1
  return births[:count], deaths[:count], pair_of_birth


@numba.jit(**_JIT)
def _dim0_comparison(level_c, rank_c, edge_order_c, edge_level_c, rank_0,
                     rank_1, pair_of_birth_0, pair_of_birth_1, strides, nd,
                     n):
  """Comparison merges in dimension 0 and the pairs they match.

  The image pairs are the same merges seen with each input's elder rule:
  every component also keeps its oldest vertex under the prediction's
  (``label_0``) and the target's (``label_1``) order, and the younger of the
  two labels is the birth of the input class that the merge kills.
  Returns ``(M, 2)`` matched pair indices into the inputs' pair lists.
  """
  parent = np.arange(n).astype(np.int32)
  label_0 = np.arange(n).astype(np.int32)
  label_1 = np.arange(n).astype(np.int32)
  matches = np.empty((n, 2), np.int32)
  count = 0
  for e in edge_order_c:
    v = e // nd
    a = _find(parent, v)
    b = _find(parent, v + strides[e % nd])
    if a == b:
      continue
    young, old = (b, a) if rank_c[a] < rank_c[b] else (a, b)
    parent[young] = old
    la, lb = label_0[a], label_0[b]
    young_0, old_0 = (lb, la) if rank_0[la] < rank_0[lb] else (la, lb)
    label_0[old] = old_0
    la, lb = label_1[a], label_1[b]
    young_1, old_1 = (lb, la) if rank_1[la] < rank_1[lb] else (la, lb)
    label_1[old] = old_1
    if level_c[young] != edge_level_c[e]:
      p0, p1 = pair_of_birth_0[young_0], pair_of_birth_1[young_1]
      if p0 >= 0 and p1 >= 0:
        matches[count, 0] = p0
        matches[count, 1] = p1
        count += 1
  return matches[:count]


@numba.jit(**_JIT)
def _wall_cells(q, top_level, strides, nd, n):
  """The two top cells a wall ``q`` bounds, ``n`` (the cell at infinity)
  where it lies on the boundary of the volume."""
  types = nd if nd == 2 else 3
  v, t = q // types, q % types
  axis = (1 - t) if nd == 2 else t
  # The wall's other coordinates fit a top cell, so a neighbour along
  # ``axis`` exists where a top cell has a level: no coordinate division.
  # Off the low edge, ``v - s`` is negative or lands on a last slice,
  # which holds no top cell.
  s = strides[axis]
  c1 = v - s if v >= s and top_level[v - s] >= 0 else n
  c2 = v if top_level[v] >= 0 else n
  return c1, c2


@numba.jit(**_JIT)
def _top_elder(a, b, rank, n):
  """``(young, old)`` of two dual components by the elder rule reversed: a
  larger rank is older, the cell at infinity ``n`` oldest."""
  if a == n or (b != n and rank[a] > rank[b]):
    return b, a
  return a, b


@numba.jit(**_JIT)
def _top_pairs(wall_order, wall_level, top_level, top_rank, top_rank_c,
               strides, nd, n):
  """Finite pairs of the top dimension by union-find on the dual graph.

  Walls (the cells one dimension below the top) are taken in decreasing
  order; each joins the two top cells it bounds (or the cell at infinity,
  id ``n``, oldest of all). A merge pairs the wall with the younger root.
  Each component also keeps its oldest top cell in the comparison's order
  (``top_rank_c``): the younger such label is the death, in the comparison,
  of the image of the class born here, and keys ``pair_of_death_c``.

  Returns ``(births, deaths, pair_of_death_c, cleared)``: birth walls and
  death top cells of the pairs, the pair index by comparison death cell (or
  -1), and which walls merged (their columns below reduce to zero).
  """
  parent = np.arange(n + 1).astype(np.int32)
  label = np.arange(n + 1).astype(np.int32)
  births = np.empty(n, np.int32)
  deaths = np.empty(n, np.int32)
  pair_of_death_c = np.full(n + 1, -1, np.int32)
  cleared = np.zeros(wall_level.size, np.bool_)
  count = 0
  for k in range(wall_order.size - 1, -1, -1):
    q = wall_order[k]
    c1, c2 = _wall_cells(q, top_level, strides, nd, n)
    a = _find(parent, c1)
    b = _find(parent, c2)
    if a == b:
      continue
    young, old = _top_elder(a, b, top_rank, n)
    parent[young] = old
    cleared[q] = True
    young_c, old_c = _top_elder(label[a], label[b], top_rank_c, n)
    label[old] = old_c
    if wall_level[q] != top_level[young]:
      births[count] = q
      deaths[count] = young
      pair_of_death_c[young_c] = count
      count += 1
  return births[:count], deaths[:count], pair_of_death_c, cleared


@numba.jit(**_JIT)
def _top_comparison(wall_order, wall_level, top_level, top_rank, strides,
                    nd, n, pair_of_death_0, pair_of_death_1):
  """The comparison's top-dimension merges and the pairs they match.

  Returns ``(matches, cleared)``: ``(M, 2)`` matched pair indices and the
  comparison's merged walls.
  """
  parent = np.arange(n + 1).astype(np.int32)
  matches = np.empty((n, 2), np.int32)
  cleared = np.zeros(wall_level.size, np.bool_)
  count = 0
  for k in range(wall_order.size - 1, -1, -1):
    q = wall_order[k]
    c1, c2 = _wall_cells(q, top_level, strides, nd, n)
    a = _find(parent, c1)
    b = _find(parent, c2)
    if a == b:
      continue
    young, old = _top_elder(a, b, top_rank, n)
    parent[young] = old
    cleared[q] = True
    if wall_level[q] != top_level[young]:
      p0, p1 = pair_of_death_0[young], pair_of_death_1[young]
      if p0 >= 0 and p1 >= 0:
        matches[count, 0] = p0
        matches[count, 1] = p1
        count += 1
  return matches[:count], cleared


@numba.jit(**_JIT)
def _face_edges(q, strides):
  """The four edges bounding 3D face ``q`` (dense ids)."""
  q = np.int64(q)
  v, t = q // 3, q % 3
  a, b = (1, 2) if t == 0 else ((0, 2) if t == 1 else (0, 1))
  return (v * 3 + a, v * 3 + b, (v + strides[b]) * 3 + a,
          (v + strides[a]) * 3 + b)


@numba.jit(**_JIT)
def _heap_push(heap, size, item):
  heap[size] = item
  i = size
  while i > 0:
    up = (i - 1) >> 1
    if heap[up] >= item:
      break
    heap[i] = heap[up]
    i = up
  heap[i] = item


@numba.jit(**_JIT)
def _heap_pop(heap, size):
  """Removes the maximum of a max-heap of ``size`` items; returns it."""
  top = heap[0]
  size -= 1
  item = heap[size]
  i = 0
  while True:
    child = 2 * i + 1
    if child >= size:
      break
    if child + 1 < size and heap[child + 1] > heap[child]:
      child += 1
    if heap[child] <= item:
      break
    heap[i] = heap[child]
    i = child
  if size > 0:
    heap[i] = item
  return top


@numba.jit(**_JIT)
def _reduce(columns, row_rank, strides, num_rows):
  """Pivots of the face-to-edge boundary matrix, reduced left to right.

  Args:
    columns: dense face ids in column order.
    row_rank: each edge's row (its rank in the row order).
    num_rows: number of rows.

  Returns:
    ``(len(columns),)`` int32 pivot row of each reduced column, -1 for zero.
  """
  ncols = columns.size
  pivot_column = np.full(num_rows, -1, np.int32)
  pivots = np.full(ncols, -1, np.int32)
  # Each column's four rows, written as it is reached: adding an earlier
  # column then reads one cache line, not five scattered arrays. A column
  # that needed reduction has -1 - (its offset in ``pool``) in slot 0 and
  # its length in slot 1 instead.
  rows = np.empty((ncols, 4), np.int32)
  pool = np.empty(1024, np.int32)
  used = 0
  stored = 0
  lengths = np.empty(1024, np.int32)
  starts = np.empty(1024, np.int64)
  heap = np.empty(1024, np.int32)
  for i in range(ncols):
    e0, e1, e2, e3 = _face_edges(columns[i], strides)
    r0, r1, r2, r3 = row_rank[e0], row_rank[e1], row_rank[e2], row_rank[e3]
    rows[i, 0], rows[i, 1], rows[i, 2], rows[i, 3] = r0, r1, r2, r3
    top = max(max(r0, r1), max(r2, r3))
    if pivot_column[top] < 0:
      # Emergent pair: the column is reduced as it stands.
      pivot_column[top] = i
      pivots[i] = top
      continue
    size = 0
    for r in (r0, r1, r2, r3):
      if r != top:
        _heap_push(heap, size, r)
        size += 1
    pivot = top
    while True:
      j = pivot_column[pivot]
      if j < 0:
        break
      # Add column j, whose pivot cancels the current one.
      first = rows[j, 0]
      if first < 0:
        s = starts[-1 - first]
        count = lengths[-1 - first]
      else:
        count = 4
      if size + count > heap.size:
        bigger = np.empty(max(2 * heap.size, size + count), np.int32)
        bigger[:size] = heap[:size]
        heap = bigger
      if first < 0:
        for k in range(s + 1, s + count):
          _heap_push(heap, size, pool[k])
          size += 1
      else:
        for k in range(4):
          r = rows[j, k]
          if r != pivot:
            _heap_push(heap, size, r)
            size += 1
      # The next pivot: the largest entry left after Z/2 cancellation.
      pivot = -1
      while size > 0:
        r = _heap_pop(heap, size)
        size -= 1
        if size > 0 and heap[0] == r:
          _heap_pop(heap, size)
          size -= 1
          continue
        pivot = r
        break
      if pivot < 0:
        break
    if pivot < 0:
      continue  # A zero column: its face creates a 2-cycle.
    pivot_column[pivot] = i
    pivots[i] = pivot
    # Keep the reduced column (pivot first, then decreasing) for reuse.
    if used + size + 1 > pool.size:
      bigger = np.empty(max(2 * pool.size, used + size + 1), np.int32)
      bigger[:used] = pool[:used]
      pool = bigger
    if stored == lengths.size:
      lengths = np.concatenate((lengths, np.empty(stored, np.int32)))
      starts = np.concatenate((starts, np.empty(stored, np.int64)))
    pool[used] = pivot
    count = 1
    while size > 0:
      r = _heap_pop(heap, size)
      size -= 1
      if size > 0 and heap[0] == r:
        _heap_pop(heap, size)
        size -= 1
        continue
      pool[used + count] = r
      count += 1
    starts[stored] = used
    lengths[stored] = count
    rows[i, 0] = -1 - stored
    stored += 1
    used += count
  return pivots


@numba.jit(**_JIT)
def _without(order, cleared):
  keep = 0
  for q in order:
    if not cleared[q]:
      keep += 1
  out = np.empty(keep, np.int32)
  k = 0
  for q in order:
    if not cleared[q]:
      out[k] = q
      k += 1
  return out


@numba.jit(**_JIT)
def match_item(f0, f1, fc, orders, shape, nd):
  """The Betti matching of two images of one shape.

  Args:
    f0, f1: flat (C-order) float64 values of the two images, NaN-free.
    fc: their pointwise minimum, the comparison image.
    orders: ``(3, n)`` int64, an argsort of each of ``f0``, ``f1``, ``fc``
      (ties in any order).
    shape: int64 ``(3,)`` spatial shape; a 2D image is ``(X, Y, 1)``.
    nd: 2 or 3, the dimension of the complex.

  Returns:
    ``(pairs_0, pairs_1, matches)``: ``(P, 3)`` int32 rows ``(dimension,
    birth voxel, death voxel)`` of every finite pair of positive
    persistence of ``f0`` and of ``f1`` (voxels as flat indices), and
    ``(M, 2)`` int32 rows of matched pair indices into them.
  """
  n = f0.size
  strides = np.array((shape[1] * shape[2], shape[2], 1), np.int64)
  level_0, rank_0, nlev_0 = _levels(f0, orders[0])
  level_1, rank_1, nlev_1 = _levels(f1, orders[1])
  level_c, rank_c, nlev_c = _levels(fc, orders[2])

  # Dimension 0.
  edge_level_0 = _cell_levels(level_0, shape, strides, nd, _EDGES)
  edge_level_1 = _cell_levels(level_1, shape, strides, nd, _EDGES)
  edge_level_c = _cell_levels(level_c, shape, strides, nd, _EDGES)
  edge_order_0, edge_rank_0 = _sort_cells(edge_level_0, nlev_0)
  edge_order_1, edge_rank_1 = _sort_cells(edge_level_1, nlev_1)
  edge_order_c, edge_rank_c = _sort_cells(edge_level_c, nlev_c)
  b0_0, d0_0, pob_0 = _dim0_pairs(level_0, rank_0, edge_order_0,
                                  edge_level_0, strides, nd, n)
  b0_1, d0_1, pob_1 = _dim0_pairs(level_1, rank_1, edge_order_1,
                                  edge_level_1, strides, nd, n)
  m0 = _dim0_comparison(level_c, rank_c, edge_order_c, edge_level_c, rank_0,
                        rank_1, pob_0, pob_1, strides, nd, n)

  # The top dimension.
  top_level_0 = _cell_levels(level_0, shape, strides, nd, _TOP)
  top_level_1 = _cell_levels(level_1, shape, strides, nd, _TOP)
  top_level_c = _cell_levels(level_c, shape, strides, nd, _TOP)
  _, top_rank_0 = _sort_cells(top_level_0, nlev_0)
  _, top_rank_1 = _sort_cells(top_level_1, nlev_1)
  _, top_rank_c = _sort_cells(top_level_c, nlev_c)
  if nd == 2:
    wall_level_0, wall_level_1, wall_level_c = (edge_level_0, edge_level_1,
                                                edge_level_c)
    wall_order_0, wall_order_1, wall_order_c = (edge_order_0, edge_order_1,
                                                edge_order_c)
  else:
    wall_level_0 = _cell_levels(level_0, shape, strides, nd, _FACES)
    wall_level_1 = _cell_levels(level_1, shape, strides, nd, _FACES)
    wall_level_c = _cell_levels(level_c, shape, strides, nd, _FACES)
    wall_order_0, _ = _sort_cells(wall_level_0, nlev_0)
    wall_order_1, _ = _sort_cells(wall_level_1, nlev_1)
    wall_order_c, _ = _sort_cells(wall_level_c, nlev_c)
  bt_0, dt_0, pod_0, cleared_0 = _top_pairs(
      wall_order_0, wall_level_0, top_level_0, top_rank_0, top_rank_c,
      strides, nd, n)
  bt_1, dt_1, pod_1, cleared_1 = _top_pairs(
      wall_order_1, wall_level_1, top_level_1, top_rank_1, top_rank_c,
      strides, nd, n)
  mt, cleared_c = _top_comparison(wall_order_c, wall_level_c, top_level_c,
                                  top_rank_c, strides, nd, n, pod_0, pod_1)

  # Dimension 1 of a 3D complex: five reductions.
  b1_0 = np.empty(0, np.int32)
  d1_0 = np.empty(0, np.int32)
  b1_1 = np.empty(0, np.int32)
  d1_1 = np.empty(0, np.int32)
  m1 = np.empty((0, 2), np.int32)
  if nd == 3:
    results = []
    for g in range(2):
      order = wall_order_0 if g == 0 else wall_order_1
      cleared = cleared_0 if g == 0 else cleared_1
      edge_rank = edge_rank_0 if g == 0 else edge_rank_1
      edge_order = edge_order_0 if g == 0 else edge_order_1
      edge_level = edge_level_0 if g == 0 else edge_level_1
      wall_level = wall_level_0 if g == 0 else wall_level_1
      columns = _without(order, cleared)
      pivots = _reduce(columns, edge_rank, strides, edge_order.size)
      births = np.empty(columns.size, np.int32)
      deaths = np.empty(columns.size, np.int32)
      pair_of_birth = np.full(edge_level.size, -1, np.int32)
      count = 0
      for i in range(columns.size):
        if pivots[i] >= 0:
          e = edge_order[pivots[i]]
          if edge_level[e] != wall_level[columns[i]]:
            births[count] = e
            deaths[count] = columns[i]
            pair_of_birth[e] = count
            count += 1
      results.append((births[:count], deaths[:count], pair_of_birth))
    b1_0, d1_0, pob1_0 = results[0]
    b1_1, d1_1, pob1_1 = results[1]
    columns = _without(wall_order_c, cleared_c)
    pivots_c = _reduce(columns, edge_rank_c, strides, edge_order_c.size)
    image_0 = _reduce(columns, edge_rank_0, strides, edge_order_0.size)
    image_1 = _reduce(columns, edge_rank_1, strides, edge_order_1.size)
    m1 = np.empty((columns.size, 2), np.int32)
    count = 0
    for i in range(columns.size):
      if pivots_c[i] < 0:
        continue
      e = edge_order_c[pivots_c[i]]
      if edge_level_c[e] == wall_level_c[columns[i]]:
        continue
      # The image pairs' births: the input classes this comparison class
      # is the image of.
      p0 = pob1_0[edge_order_0[image_0[i]]]
      p1 = pob1_1[edge_order_1[image_1[i]]]
      if p0 >= 0 and p1 >= 0:
        m1[count, 0] = p0
        m1[count, 1] = p1
        count += 1
    m1 = m1[:count]

  # Voxels of every pair, and the matches as indices into the pair lists.
  top = nd - 1
  outputs = []
  for g in range(2):
    level = level_0 if g == 0 else level_1
    b0, d0 = (b0_0, d0_0) if g == 0 else (b0_1, d0_1)
    b1, d1 = (b1_0, d1_0) if g == 0 else (b1_1, d1_1)
    bt, dt = (bt_0, dt_0) if g == 0 else (bt_1, dt_1)
    total = b0.size + b1.size + bt.size
    pairs = np.empty((total, 3), np.int32)
    k = 0
    for i in range(b0.size):
      pairs[k, 0] = 0
      pairs[k, 1] = b0[i]
      pairs[k, 2] = _edge_voxel(level, d0[i], strides, nd)
      k += 1
    for i in range(b1.size):
      pairs[k, 0] = 1
      pairs[k, 1] = _edge_voxel(level, b1[i], strides, nd)
      pairs[k, 2] = _wall_voxel(level, d1[i], strides, nd)
      k += 1
    for i in range(bt.size):
      pairs[k, 0] = top
      pairs[k, 1] = _wall_voxel(level, bt[i], strides, nd)
      pairs[k, 2] = _top_voxel(level, dt[i], strides, nd)
      k += 1
    outputs.append(pairs)
  matches = np.empty((m0.shape[0] + m1.shape[0] + mt.shape[0], 2), np.int32)
  offset_0 = (0, b0_0.size, b0_0.size + b1_0.size)
  offset_1 = (0, b0_1.size, b0_1.size + b1_1.size)
  k = 0
  for dim in range(3):
    m = m0 if dim == 0 else (m1 if dim == 1 else mt)
    slot = 2 if dim == 2 or (dim == 1 and nd == 2) else dim
    for i in range(m.shape[0]):
      matches[k, 0] = m[i, 0] + offset_0[slot]
      matches[k, 1] = m[i, 1] + offset_1[slot]
      k += 1
  return outputs[0], outputs[1], matches
