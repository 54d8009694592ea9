"""A synthetic streaming world: users, a growing catalog, sessions of impressions and engagements.

The same latent model drives the logged history and the user simulator, so an A/B rehearsal can
show a new policy's slates to simulated users and get answers consistent with the training data.

Model (all vectorized numpy; shapes in brackets)
------------------------------------------------
* Genres: ``n_genres`` random unit centroids ``C`` [G, dim].
* Items [I]: a primary genre (and a secondary one for 30%); taste vector
  ``v = normalize(C[g1] + 0.5 C[g2] + 0.8 z)``; Zipf popularity weight ``w = rank^-alpha`` (random
  ranks); ``created_at``: ``catalog_at_start`` of items exist before ``start_ms``, the rest are
  released uniformly over the window (fresh items).
* Users [U]: two favourite genres, ``u = normalize(C[a] + 0.6 C[b] + 0.8 z)``; activity
  ~ lognormal (heavy-tailed); ``users_at_start`` signed up before the window, the rest during it.
* Relevance logit of item i for user u at time t:
  ``taste_weight * cos(u, v_i) + popularity_weight * zscore(log w_i)
  + fresh_weight * exp(-(t - created_i) / 3 days) + base_logit``.
* Position bias: P(examine position p) = 1 / log2(p + 2) (p = 0 is the top slot, examined).
  P(click) = examine * sigmoid(relevance logit). Given a click: play (85%) with a watched fraction
  ``sigmoid(relevance logit + N(0,1))`` of the item's duration (``dwell_ms``), complete when the
  fraction >= 0.9, like / share / add-to-list more likely the better the taste match, dislike more
  likely the worse.
* Logging policy (who decides what is shown): each of ``slate_size`` slots is drawn from released
  items — ``explore_share`` uniformly, ``personalized_share`` by popularity within one of the
  user's two favourite genres, the rest by global popularity — then in-slate duplicates are
  redrawn uniformly until none is left (unless fewer items than slots are released). An
  impression's ``propensity`` is the probability that one slot draw picks that item (before
  de-duplication), which IPS-style estimators can use.

Event time vs arrival: each event has ``ts`` (when it happened) and ``arrival_ts`` (when the
landing consumer would see it: a few seconds later, ``late_share`` of them 1-48 hours later);
``duplicate_share`` of events are delivered twice (same ``event_id``), as at-least-once Kafka
delivery does. The landing writer partitions by ``arrival_ts``.

IDs: users ``u<index>``, items ``i<index>``, sessions ``s<seed>.<day>.<part>.<n>``, requests
``r<seed>.<day>.<part>.<n>``, events ``<request_id>.<position>.<type code>``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from tandem import schema as s
from tandem.config import Paths
from tandem.data.dataset import (
    EVENT_ARROW_SCHEMA,
    EVENT_COLUMNS,
    ITEM_ARROW_SCHEMA,
    ITEM_COLUMNS,
    USER_ARROW_SCHEMA,
    Dataset,
    conform,
)
from tandem.data.landing import write_events_parquet, write_items, write_landing_events, write_users
from tandem.data.world_config import (
    AGE_BUCKETS,
    ARRIVAL_TS,
    COUNTRIES,
    DAY_MS,
    DEVICES,
    EVENT_CODES,
    EVENT_KINDS,
    GENDERS,
    GENRE_NAMES,
    LANGUAGES,
    OCCUPATIONS,
    SURFACES,
    Engagement,
    WorldConfig,
    duplicate_mask,
    id_array,
    named,
    segment_draw,
    sigmoid,
    unit_rows,
    years_of,
)


class World:
    """Users and items with latent tastes; generates logged events and simulates engagement.

    Build with :meth:`generate`. Attributes (numpy, row = dense index, id = ``u<i>``/``i<j>``):
    ``user_vec`` [U, dim], ``user_genres`` [U, 2], ``user_activity`` [U], ``user_signup`` [U] ms,
    ``item_vec`` [I, dim], ``item_genre`` [I] (primary), ``item_genre2`` [I] (-1 if none),
    ``item_weight`` [I] (Zipf popularity), ``item_created`` [I] ms, ``item_duration_s`` [I].
    """

    def __init__(self, cfg: WorldConfig) -> None:
        self.cfg = cfg

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def generate(cls, cfg: WorldConfig) -> World:
        """Draw users and items (deterministic by ``cfg.seed``) and calibrate the event volume."""
        w = cls(cfg)
        rng = np.random.default_rng([cfg.seed, 0])
        g, d = cfg.n_genres, cfg.dim
        w.genre_names = tuple(GENRE_NAMES[:g]) + tuple(f"Genre-{j}" for j in range(18, g))
        w.centroids = unit_rows(rng.standard_normal((g, d)))
        w._make_items(rng)
        w._make_users(rng)
        w._index()
        w.events_per_request = w._calibrate()
        return w

    def _make_items(self, rng: np.random.Generator) -> None:
        cfg, n = self.cfg, self.cfg.n_items
        self.item_genre = rng.integers(0, cfg.n_genres, n)
        second = (self.item_genre + rng.integers(1, max(cfg.n_genres, 2), n)) % cfg.n_genres
        self.item_genre2 = np.where(rng.random(n) < 0.3, second, -1)
        noise = rng.standard_normal((n, cfg.dim)) / math.sqrt(cfg.dim)
        sec = np.where((self.item_genre2 >= 0)[:, None], self.centroids[self.item_genre2], 0.0)
        self.item_vec = unit_rows(self.centroids[self.item_genre] + 0.5 * sec + 0.8 * noise)
        self.item_weight = (rng.permutation(n) + 1.0) ** -cfg.popularity_alpha
        logw = np.log(self.item_weight)
        self.item_pop = ((logw - logw.mean()) / (logw.std() + 1e-9)).astype(np.float32)
        fresh = rng.random(n) >= cfg.catalog_at_start
        back = cfg.start_ms - (rng.exponential(3 * 365, n).clip(0, 30 * 365) * DAY_MS)
        new = cfg.start_ms + rng.random(n) * cfg.days * DAY_MS
        self.item_created = np.where(fresh, new, back).astype(np.int64)
        self.item_duration_s = np.exp(rng.normal(math.log(5400), 0.3, n)).clip(60, 36000)
        self.item_duration_s = self.item_duration_s.astype(np.int64)
        self.item_language = rng.choice(len(LANGUAGES), n, p=[0.8, 0.06, 0.04, 0.04, 0.03, 0.03])

    def _make_users(self, rng: np.random.Generator) -> None:
        cfg, n = self.cfg, self.cfg.n_users
        a = rng.integers(0, cfg.n_genres, n)
        b = (a + rng.integers(1, max(cfg.n_genres, 2), n)) % cfg.n_genres
        self.user_genres = np.stack([a, b], axis=1)
        noise = rng.standard_normal((n, cfg.dim)) / math.sqrt(cfg.dim)
        self.user_vec = unit_rows(self.centroids[a] + 0.6 * self.centroids[b] + 0.8 * noise)
        self.user_activity = rng.lognormal(0.0, 1.0, n)
        fresh = rng.random(n) >= cfg.users_at_start
        back = cfg.start_ms - rng.random(n) * 730 * DAY_MS
        new = cfg.start_ms + rng.random(n) * cfg.days * DAY_MS
        self.user_signup = np.where(fresh, new, back).astype(np.int64)
        self.user_device = rng.choice(len(DEVICES), n, p=[0.55, 0.3, 0.15])
        self.user_country = rng.choice(len(COUNTRIES), n, p=np.r_[0.4, np.full(9, 0.6 / 9)])
        self.user_age = rng.choice(len(AGE_BUCKETS), n, p=[.05, .2, .3, .2, .1, .08, .07])
        self.user_gender = rng.integers(0, len(GENDERS), n)
        self.user_occupation = rng.integers(0, len(OCCUPATIONS), n)

    def _index(self) -> None:
        """Sorted views the samplers need: items by release, items by (genre, release), users
        by signup, each with the inclusive cumsum of its sampling weights."""
        self.item_by_time = np.argsort(self.item_created, kind="stable")
        self.item_time_sorted = self.item_created[self.item_by_time]
        self.item_cum = np.cumsum(self.item_weight[self.item_by_time])
        self.item_by_genre = np.lexsort((self.item_created, self.item_genre))
        self.genre_cum = np.cumsum(self.item_weight[self.item_by_genre])
        self.genre_start = np.searchsorted(self.item_genre[self.item_by_genre],
                                           np.arange(self.cfg.n_genres))
        self.genre_created = self.item_created[self.item_by_genre]
        self.user_by_time = np.argsort(self.user_signup, kind="stable")
        self.user_time_sorted = self.user_signup[self.user_by_time]
        self.user_cum = np.cumsum(self.user_activity[self.user_by_time])
        self.user_id = id_array("u", self.cfg.n_users)
        self.item_id = id_array("i", self.cfg.n_items)

    def _calibrate(self) -> float:
        """Events per request (impressions + engagements) measured on a pilot of 2,000 requests
        in the middle of the window, so ``n_events_target`` maps to a request count."""
        rng = np.random.default_rng([self.cfg.seed, 2])
        t = self.cfg.start_ms + self.cfg.days * DAY_MS // 2
        users = self._draw_users(2000, t, rng)
        slate, _ = self._draw_slates(users, t, rng)
        e = self.simulate(users, slate, rng, now_ms=t)
        n = (1 + e.click + e.play + e.complete + e.like + e.dislike + e.share + e.add_to_list)
        return float(n.sum(axis=1).mean())

    # -------------------------------------------------------------------------- the simulator
    def taste(self, user_idx: np.ndarray, shown: np.ndarray) -> np.ndarray:
        """Cosine [n, k] between users ``user_idx`` [n] and items ``shown`` [n, k]."""
        return np.einsum("nd,nkd->nk", self.user_vec[user_idx], self.item_vec[shown])

    def relevance_logit(self, user_idx: np.ndarray, shown: np.ndarray,
                        now_ms: int | np.ndarray | None = None,
                        cos: np.ndarray | None = None) -> np.ndarray:
        """Relevance logit [n, k] of items ``shown`` [n, k] for users ``user_idx`` [n]."""
        cfg = self.cfg
        cos = self.taste(user_idx, shown) if cos is None else cos
        logit = cfg.taste_weight * cos + cfg.popularity_weight * self.item_pop[shown]
        if now_ms is not None:
            age = (np.reshape(now_ms, (-1, 1)) - self.item_created[shown]) / (3 * DAY_MS)
            logit = logit + cfg.fresh_weight * np.exp(-np.clip(age, 0, None))
        return logit + cfg.base_logit

    def simulate(self, user_idx: np.ndarray, shown: np.ndarray, rng: np.random.Generator,
                 now_ms: int | np.ndarray | None = None) -> Engagement:
        """What users ``user_idx`` [n] do with the slates ``shown`` [n, k] (item indices).

        Column ``p`` of ``shown`` is position ``p`` (0 = top). ``now_ms`` (scalar or [n]) turns
        on the freshness bonus. Same latent model as the logged history; vectorized.
        """
        user_idx, shown = np.asarray(user_idx), np.asarray(shown)
        cos = self.taste(user_idx, shown)
        logit = self.relevance_logit(user_idx, shown, now_ms, cos)
        examine = 1.0 / np.log2(np.arange(shown.shape[1]) + 2.0)
        p_click = examine * sigmoid(logit)
        r = rng.random((7, *shown.shape))
        click = r[0] < p_click
        play = click & (r[1] < 0.85)
        frac = sigmoid(logit + rng.standard_normal(shown.shape))
        dwell = np.where(play, frac * self.item_duration_s[shown] * 1000, 0).astype(np.int64)
        complete = play & (frac >= 0.9)
        like = play & (r[2] < 0.4 * sigmoid(3 * cos - 1))
        dislike = click & ~like & (r[3] < 0.5 * sigmoid(-3 * cos - 1))
        share = play & (r[4] < 0.05 * sigmoid(3 * cos))
        add = click & (r[5] < 0.1 * sigmoid(3 * cos))
        return Engagement(click, play, np.minimum(dwell, DAY_MS), complete, like, dislike, share,
                          add, p_click)

    def respond(self, user_ids: Sequence[str], slates: Sequence[Sequence[str]],
                request_ids: Sequence[str], ts_ms: Sequence[int], rng: np.random.Generator
                ) -> pa.Table:
        """The engagement events (event.v1 columns; no impressions: whoever served the slates
        logs those) of users ``user_ids`` [n] with slates something else served them, such as
        the gRPC server in the closed-loop rehearsal: ``slates`` [n] lists of world item ids in
        position order (ragged allowed), shown at ``ts_ms`` [n] for ``request_ids`` [n].

        :meth:`simulate` decides what each user does. Time is compressed so a rehearsal never
        waits for a film to end (and never stamps an event in the future): the click comes
        1 s + 0.4 s per position after the impression, a play 1 s after the click and the
        end-of-watch events (complete, like, dislike, share, add to list) 1 s after that;
        ``dwell_ms`` keeps the modelled watch time.
        """
        n, k = len(user_ids), max((len(x) for x in slates), default=0)
        valid = np.arange(k) < np.array([len(x) for x in slates])[:, None]
        shown = np.zeros((n, k), np.int64)
        shown[valid] = self.item_index(np.concatenate([np.asarray(x, object) for x in slates]))
        e = self.simulate(self.user_index(np.asarray(user_ids, object)), shown, rng)
        masks = (e.click, e.play, e.complete, e.like, e.dislike, e.share, e.add_to_list)
        flat = [np.flatnonzero(m & valid) for m in masks]
        idx = np.concatenate(flat)
        kind = np.repeat(np.arange(1, len(EVENT_KINDS)), [len(f) for f in flat])
        req, pos = idx // max(k, 1), idx % max(k, 1)
        delay = 1000 + 400 * pos + 1000 * np.minimum(kind - 1, 2)
        ts = np.asarray(ts_ms, np.int64)[req] + delay
        order = np.lexsort((kind, ts))
        req, pos, kind, ts = req[order], pos[order], kind[order], ts[order]
        request = pa.array(list(request_ids), pa.string()).take(pa.array(req))
        pos_a = pa.array(pos)
        played = np.isin(kind, (2, 3))
        m = len(req)
        return pa.table({
            s.EVENT_ID: pc.binary_join_element_wise(request, pc.cast(pos_a, pa.string()),
                                                    named(EVENT_CODES, kind), "."),
            s.EVENT_TYPE: named(EVENT_KINDS, kind),
            s.USER_ID: pa.array(list(user_ids), pa.string()).take(pa.array(req)),
            s.ITEM_ID: self.item_id.take(pa.array(shown[req, pos])),
            s.TS: pa.array(ts), s.SESSION_ID: pa.nulls(m, pa.string()), s.REQUEST_ID: request,
            s.POSITION: pos_a,
            s.DWELL_MS: pa.array(np.where(played, e.dwell_ms[req, pos], 0), mask=~played),
            **{c: pa.nulls(m, EVENT_ARROW_SCHEMA.field(c).type)
               for c in (s.VALUE, s.CTX_DEVICE, s.CTX_COUNTRY, s.CTX_SURFACE, s.EXPERIMENT,
                         s.VARIANT, s.MODEL_VERSION, s.PROPENSITY)},
        }).cast(EVENT_ARROW_SCHEMA)

    # ------------------------------------------------------------------------ logging policy
    def _draw_users(self, n: int, t_ms: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` users signed up by ``t_ms``, drawn by activity."""
        k = max(int(np.searchsorted(self.user_time_sorted, t_ms, side="right")), 1)
        pos = segment_draw(self.user_cum, np.zeros(n, np.int64), np.full(n, k), rng.random(n))
        return self.user_by_time[pos]

    def _draw_slates(self, users: np.ndarray, t_ms: int, rng: np.random.Generator
                     ) -> tuple[np.ndarray, np.ndarray]:
        """Slates [n, k] of items released by ``t_ms`` and each impression's propensity [n, k]."""
        cfg, n, k = self.cfg, len(users), self.cfg.slate_size
        n_items = max(int(np.searchsorted(self.item_time_sorted, t_ms, side="right")), 1)
        gstart = self.genre_start
        gend = np.r_[gstart[1:], self.cfg.n_items]
        released = np.array([np.searchsorted(self.genre_created[a:b], t_ms, side="right")
                             for a, b in zip(gstart, gend, strict=True)])  # loop over genres
        genre = self.user_genres[users[:, None], rng.integers(0, 2, (n, k))]
        lo, hi = gstart[genre], gstart[genre] + released[genre]
        kind = rng.random((n, k))
        personal = (kind >= cfg.explore_share) & (kind < cfg.explore_share
                                                  + cfg.personalized_share) & (hi > lo)
        u = rng.random((n, k))
        pop = self.item_by_time[segment_draw(self.item_cum, np.zeros_like(lo),
                                             np.full_like(lo, n_items), u)]
        per = self.item_by_genre[segment_draw(self.genre_cum, lo, hi, u)]
        slate = np.where(personal, per, pop)
        explore = kind < cfg.explore_share
        slate[explore] = self.item_by_time[rng.integers(0, n_items, int(explore.sum()))]
        for _ in range(50):  # redraw in-slate duplicates uniformly (few rounds, vectorized)
            dup = duplicate_mask(slate)
            if not dup.any() or n_items < k:
                break
            slate[dup] = self.item_by_time[rng.integers(0, n_items, int(dup.sum()))]
        return slate, self._propensity(users, slate, n_items, released)

    def _propensity(self, users: np.ndarray, slate: np.ndarray, n_items: int,
                    released: np.ndarray) -> np.ndarray:
        """P(one slot draw picks the item) [n, k]: the mixture of the three slot samplers."""
        cfg, w, last = self.cfg, self.item_weight[slate], self.cfg.n_items - 1
        start = self.genre_start
        base = np.where(start > 0, self.genre_cum[np.clip(start - 1, 0, last)], 0.0)
        top = self.genre_cum[np.clip(start + released - 1, 0, last)]
        total_g = np.where(released > 0, top - base, 0.0)  # released weight per genre [G]
        g = self.item_genre[slate]
        ug = self.user_genres[users]
        p_genre = sum(0.5 * (g == ug[:, j:j + 1]) / np.maximum(total_g[ug[:, j:j + 1]], 1e-300)
                      for j in range(2))
        p = (cfg.explore_share / n_items
             + cfg.personalized_share * w * p_genre
             + (1 - cfg.explore_share - cfg.personalized_share) * w / self.item_cum[n_items - 1])
        return np.clip(p, 0.0, 1.0)

    # ------------------------------------------------------------------------------- events
    def chunks(self) -> list[tuple[int, int, int]]:
        """The plan: ``(day, part, n_sessions)`` per chunk; each chunk covers one day's part."""
        cfg = self.cfg
        requests_per_day = cfg.n_events_target / self.events_per_request / cfg.days
        parts = max(math.ceil(requests_per_day / cfg.chunk_requests), 1)
        sessions = max(int(round(requests_per_day / parts / 2.0)), 1)  # sessions average 2 req
        return [(d, p, sessions) for d in range(cfg.days) for p in range(parts)]

    def generate_events(self) -> Iterator[pa.Table]:
        """Yield one Arrow table per chunk (contract columns + ``arrival_ts``), sorted by ts."""
        for day, part, n_sessions in self.chunks():
            yield self.chunk_events(day, part, n_sessions)

    def chunk_events(self, day: int, part: int, n_sessions: int) -> pa.Table:
        """One chunk's events: sessions starting on ``day``; deterministic by (seed, day, part)."""
        cfg, k = self.cfg, self.cfg.slate_size
        rng = np.random.default_rng([cfg.seed, 1, day, part])
        day_start = cfg.start_ms + day * DAY_MS
        users_s = self._draw_users(n_sessions, day_start, rng)
        length = rng.geometric(0.5, n_sessions)
        sess = np.repeat(np.arange(n_sessions), length)
        first = np.r_[0, np.cumsum(length)[:-1]]
        gaps = rng.integers(20_000, 180_000, len(sess))
        gaps[first] = 0
        cs = np.cumsum(gaps)
        start = day_start + rng.integers(0, DAY_MS, n_sessions)
        req_ts = start[sess] + cs - cs[first][sess]
        users = users_s[sess]
        n_req = len(sess)
        slate, prop = self._draw_slates(users, day_start, rng)
        e = self.simulate(users, slate, rng, now_ms=req_ts)

        device = np.where(rng.random(n_req) < 0.85, self.user_device[users],
                          rng.integers(0, len(DEVICES), n_req))
        surface = rng.choice(len(SURFACES), n_req, p=[0.6, 0.2, 0.12, 0.08])
        click_ts = req_ts[:, None] + 1000 + 500 * np.arange(k) + rng.exponential(3000, (n_req, k))
        play_ts = click_ts + rng.integers(500, 3000, (n_req, k))
        end_ts = play_ts + e.dwell_ms
        times = (np.broadcast_to(req_ts[:, None], (n_req, k)), click_ts, play_ts, end_ts,
                 end_ts + 2000, click_ts + 2000 + e.dwell_ms, end_ts + 5000, click_ts + 3000)
        masks = (np.ones((n_req, k), bool), e.click, e.play, e.complete, e.like, e.dislike,
                 e.share, e.add_to_list)
        flat = [np.flatnonzero(m) for m in masks]
        idx = np.concatenate(flat)  # flat index into [n_req, k]
        kind = np.repeat(np.arange(len(EVENT_KINDS)), [len(f) for f in flat])
        ts = np.concatenate([t.ravel()[f] for t, f in zip(times, flat, strict=True)])
        ts = ts.astype(np.int64)
        order = np.argsort(ts, kind="stable")
        idx, kind, ts = idx[order], kind[order], ts[order]
        req, pos = idx // k, idx % k
        table = self._event_table(day, part, req, pos, kind, ts, users, sess, slate, prop, e,
                                  device, surface)
        return self._deliver(table, ts, rng)

    def _event_table(self, day: int, part: int, req: np.ndarray, pos: np.ndarray,
                     kind: np.ndarray, ts: np.ndarray, users: np.ndarray, sess: np.ndarray,
                     slate: np.ndarray, prop: np.ndarray, e: Engagement, device: np.ndarray,
                     surface: np.ndarray) -> pa.Table:
        """Contract columns for events given per event: request ``req``, position ``pos``,
        type code ``kind`` (index into ``EVENT_KINDS``), ``ts``; per request: ``users``, ``sess``,
        ``device``, ``surface``; per request and position: ``slate``, ``prop``, ``e``."""
        n, tag, n_req = len(req), f"{self.cfg.seed}.{day}.{part}.", len(users)
        req_ids = id_array(f"r{tag}", n_req).take(pa.array(req))
        sess_ids = pc.binary_join_element_wise(f"s{tag}", pc.cast(pa.array(sess), pa.string()), "")
        pos_a = pa.array(pos)
        is_imp = kind == 0
        dwell = np.where(np.isin(kind, (2, 3)), e.dwell_ms[req, pos], 0)
        cols = {
            s.EVENT_ID: pc.binary_join_element_wise(req_ids, pc.cast(pos_a, pa.string()),
                                                    named(EVENT_CODES, kind), "."),
            s.EVENT_TYPE: named(EVENT_KINDS, kind),
            s.USER_ID: self.user_id.take(pa.array(users[req])),
            s.ITEM_ID: self.item_id.take(pa.array(slate[req, pos])),
            s.TS: pa.array(ts),
            s.SESSION_ID: sess_ids.take(pa.array(req)),
            s.REQUEST_ID: req_ids,
            s.POSITION: pos_a,
            s.DWELL_MS: pa.array(dwell, mask=~np.isin(kind, (2, 3))),
            s.VALUE: pa.nulls(n, pa.float64()),
            s.CTX_DEVICE: named(DEVICES, device[req]),
            s.CTX_COUNTRY: named(COUNTRIES, self.user_country[users[req]]),
            s.CTX_SURFACE: named(SURFACES, surface[req]),
            s.EXPERIMENT: pa.nulls(n, pa.string()),
            s.VARIANT: pa.nulls(n, pa.string()),
            s.MODEL_VERSION: pa.nulls(n, pa.string()),
            s.PROPENSITY: pa.array(prop[req, pos], mask=~is_imp),
        }
        return pa.table(cols).cast(EVENT_ARROW_SCHEMA)

    def _deliver(self, table: pa.Table, ts: np.ndarray, rng: np.random.Generator) -> pa.Table:
        """Add ``arrival_ts`` (a few seconds late; ``late_share`` 1-48 h late) and re-deliver
        ``duplicate_share`` of events once more, later."""
        cfg, n = self.cfg, len(ts)
        arrival = ts + rng.exponential(2000, n).astype(np.int64)
        late = rng.random(n) < cfg.late_share
        arrival[late] += rng.integers(3_600_000, 48 * 3_600_000, int(late.sum()))
        table = table.append_column(ARRIVAL_TS, pa.array(arrival))
        dup = np.flatnonzero(rng.random(n) < cfg.duplicate_share)
        if len(dup) == 0:
            return table
        again = table.take(pa.array(dup))
        later = arrival[dup] + rng.integers(1000, 3_600_000, len(dup))
        again = again.set_column(again.schema.get_field_index(ARRIVAL_TS), ARRIVAL_TS,
                                 pa.array(later))
        return pa.concat_tables([table, again])

    # -------------------------------------------------------------------- contract tables
    def items_table(self) -> pa.Table:
        """The catalog as item.v1 rows (``genres`` = primary [+ secondary] genre names)."""
        n = self.cfg.n_items
        names = pa.array(self.genre_names)
        has2 = self.item_genre2 >= 0
        values = np.stack([self.item_genre, np.where(has2, self.item_genre2, 0)], 1).ravel()
        keep = np.stack([np.ones(n, bool), has2], 1).ravel()
        offsets = np.r_[0, np.cumsum(1 + has2)].astype(np.int32)
        genres = pa.ListArray.from_arrays(pa.array(offsets), names.take(pa.array(values[keep])))
        title = pc.binary_join_element_wise(names.take(pa.array(self.item_genre)),
                                            pc.cast(pa.array(np.arange(n)), pa.string()), " #")
        return pa.table({
            s.ITEM_ID: self.item_id, s.TITLE: title, s.GENRES: genres,
            s.RELEASE_YEAR: pa.array(years_of(self.item_created)),
            s.DURATION_S: pa.array(self.item_duration_s),
            s.LANGUAGE: named(LANGUAGES, self.item_language),
            s.CREATED_AT: pa.array(self.item_created),
        }).cast(ITEM_ARROW_SCHEMA)

    def users_table(self) -> pa.Table:
        """The users as user.v1 rows."""
        return pa.table({
            s.USER_ID: self.user_id, s.SIGNUP_TS: pa.array(self.user_signup),
            s.AGE_BUCKET: named(AGE_BUCKETS, self.user_age),
            s.GENDER: named(GENDERS, self.user_gender),
            s.OCCUPATION: named(OCCUPATIONS, self.user_occupation),
            s.COUNTRY: named(COUNTRIES, self.user_country),
        }).cast(USER_ARROW_SCHEMA)

    def to_dataset(self) -> Dataset:
        """Everything in memory as a :class:`Dataset` (small worlds only; arrival/duplicates
        dropped, so ``events`` holds each event once)."""
        events = pa.concat_tables(list(self.generate_events()))
        frame = events.select(list(EVENT_COLUMNS)).to_pandas()
        frame = conform(frame.drop_duplicates(s.EVENT_ID), EVENT_COLUMNS)
        items = self.items_table()
        items_frame = items.drop_columns([s.GENRES]).to_pandas()
        items_frame[s.GENRES] = items.column(s.GENRES).to_pylist()
        return Dataset(events=frame, items=conform(items_frame, ITEM_COLUMNS),
                       users=self.users_table().to_pandas(), name=f"world-{self.cfg.seed}")

    def user_index(self, user_ids: pd.Series | np.ndarray) -> np.ndarray:
        """Dense indices of ``u<i>`` ids."""
        return pd.Series(user_ids).str.slice(1).astype(np.int64).to_numpy()

    def item_index(self, item_ids: pd.Series | np.ndarray) -> np.ndarray:
        """Dense indices of ``i<j>`` ids."""
        return pd.Series(item_ids).str.slice(1).astype(np.int64).to_numpy()

    def write(self, paths: Paths, events_parquet: Path | None = None) -> dict[str, int]:
        """Write items, users and events (landing JSON lines, or parquet under
        ``events_parquet`` partitioned by arrival hour). Overwrite-idempotent per chunk."""
        write_items(self.items_table(), paths)
        write_users(self.users_table(), paths)
        n = 0
        for (day, part, _), table in zip(self.chunks(), self.generate_events(), strict=True):
            name = f"world-{self.cfg.seed}-d{day:03d}-p{part:03d}"
            if events_parquet is None:
                write_landing_events(table, paths.landing_events, name, arrival=ARRIVAL_TS)
            else:
                write_events_parquet(table, events_parquet, name, by=ARRIVAL_TS)
            n += table.num_rows
        return {"items": self.cfg.n_items, "users": self.cfg.n_users, "events": n}
