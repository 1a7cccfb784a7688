//! The simulated world: replicas, catalog, metadata store, attachments, faults, main loop.

use std::collections::{BTreeMap, VecDeque};

use bw_types::Generation;

use crate::config::{AttachInit, Config, ReplicaInit};
use crate::ids::{
    CopyId, DataHandle, MetaBatchId, RegionSet, ReplicaId, RequestId, SessionId, TxnId,
};
use crate::io::{CatalogOp, Event, MetaBatch, ReplicaOutcome, TxnOutcome};
use crate::replica::ReplicaState;
use crate::Replicator;

use super::client::{Client, Model};
use super::rng::Rng;
use super::{SimParams, SimReport, Violation};

/// Attachments started per run at most by faults (stops still start new ones).
const MAX_FAULT_TAKEOVERS: u64 = 8;

/// One replica: a durable store, a volatile cache over it, and its generation fence.
#[derive(Debug)]
pub(super) struct SimReplica {
    pub alive: bool,
    pub restart_at: u64,
    /// The fence: highest generation admitted.
    pub highest_gen: u64,
    /// Fail-stopped after an I/O error until the next session reopens it.
    pub faulted: bool,
    pub durable: Vec<u64>,
    pub cache: BTreeMap<usize, u64>,
    /// G2: generation of the last write accepted.
    pub last_write_gen: u64,
    pub fail_next_io: bool,
    pub slow_until: u64,
}

impl SimReplica {
    pub fn view(&self) -> Vec<u64> {
        let mut v = self.durable.clone();
        for (b, x) in &self.cache {
            v[*b] = *x;
        }
        v
    }

    pub fn sync(&mut self) {
        for (b, x) in std::mem::take(&mut self.cache) {
            self.durable[b] = x;
        }
    }

    /// Power loss: the disk may have written back any part of the cache.
    pub fn lose_cache(&mut self, rng: &mut Rng) {
        for (b, x) in std::mem::take(&mut self.cache) {
            if rng.chance(500_000) {
                self.durable[b] = x;
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum AttState {
    Running,
    /// Frozen (a stalled host): events wait, its messages already sent still land.
    Paused {
        until: u64,
    },
    Crashed,
    Stopped,
}

/// A region copy in progress in the driver.
#[derive(Clone, Debug)]
pub(super) struct CopyTask {
    pub from: usize,
    pub from_session: SessionId,
    pub to: usize,
    pub to_session: SessionId,
    pub first: usize,
    /// Read from the source done; the write to the target is in flight.
    pub writing: bool,
}

#[derive(Debug)]
pub(super) struct Att {
    pub gen: Generation,
    pub core: Replicator,
    pub state: AttState,
    pub client: Client,
    pub copies: BTreeMap<CopyId, CopyTask>,
    pub conns: Vec<Option<SessionId>>,
    pub cut_until: Vec<u64>,
    pub reconnect_at: Vec<u64>,
    pub catalog_cut_until: u64,
    pub lease_lost_at: Option<u64>,
    pub deferred: Vec<Event>,
    pub was_serving: bool,
}

#[derive(Debug)]
pub(super) struct Catalog {
    pub generation: u64,
    pub in_sync: Vec<bool>,
    pub last_in_sync_gen: Vec<u64>,
    pub down_until: u64,
}

/// Where attachments persist the activity log and dirty bitmaps; fenced by generation like
/// the replicas (in production it lives on the replicas, see the design doc).
#[derive(Debug)]
pub(super) struct MetaStore {
    pub gen: u64,
    pub al: RegionSet,
    pub bitmaps: Vec<RegionSet>,
}

#[derive(Debug)]
pub(super) enum ReplicaReq {
    Write {
        op: crate::OpId,
        first: usize,
        vals: Vec<u64>,
        fua: bool,
    },
    Flush {
        op: crate::OpId,
    },
    Read {
        op: crate::OpId,
        first: usize,
        n: usize,
    },
    CopyRead {
        copy: CopyId,
        first: usize,
        n: usize,
    },
    CopyWrite {
        copy: CopyId,
        first: usize,
        vals: Vec<u64>,
    },
}

#[derive(Debug)]
pub(super) enum ReplicaRep {
    Op {
        op: crate::OpId,
        outcome: ReplicaOutcome,
    },
    CopyRead {
        copy: CopyId,
        vals: Vec<u64>,
    },
    CopyWritten {
        copy: CopyId,
    },
    CopyFailed {
        copy: CopyId,
        why: String,
    },
    Fenced {
        highest: u64,
    },
}

#[derive(Debug)]
pub(super) enum Body {
    ToReplica {
        r: usize,
        session: SessionId,
        req: ReplicaReq,
    },
    FromReplica {
        r: usize,
        session: SessionId,
        rep: ReplicaRep,
    },
    ToCatalog {
        txn: TxnId,
        op: CatalogOp,
    },
    FromCatalog {
        txn: TxnId,
        outcome: TxnOutcome,
    },
    ToMeta {
        batch: MetaBatchId,
        changes: MetaBatch,
    },
    FromMeta {
        batch: MetaBatchId,
        fenced_by: Option<u64>,
    },
}

#[derive(Debug)]
pub(super) struct Msg {
    pub at: u64,
    pub att: usize,
    pub body: Body,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RunPhase {
    Faults,
    Heal,
    /// Everything in sync: the client stops issuing and waits for its requests.
    Draining,
    /// The final flush is out.
    Final(RequestId),
}

pub(super) struct World {
    pub p: SimParams,
    pub rng: Rng,
    pub now: u64,
    pub reps: Vec<SimReplica>,
    pub atts: Vec<Att>,
    pub cur: usize,
    pub catalog: Catalog,
    pub meta: MetaStore,
    pub net: Vec<Msg>,
    pub inbox: VecDeque<(usize, Event)>,
    pub model: Model,
    pub reads: BTreeMap<DataHandle, Vec<u64>>,
    pub next_handle: u64,
    pub next_session: u64,
    pub report: SimReport,
    pub violation: Option<Violation>,
    phase: RunPhase,
    final_flushed: bool,
}

impl World {
    pub fn new(p: SimParams) -> World {
        let reps = (0..p.replicas)
            .map(|_| SimReplica {
                alive: true,
                restart_at: 0,
                highest_gen: 0,
                faulted: false,
                durable: vec![0; p.blocks],
                cache: BTreeMap::new(),
                last_write_gen: 0,
                fail_next_io: false,
                slow_until: 0,
            })
            .collect();
        World {
            rng: Rng::new(p.seed),
            now: 0,
            reps,
            atts: Vec::new(),
            cur: 0,
            catalog: Catalog {
                generation: 0,
                in_sync: vec![true; p.replicas],
                last_in_sync_gen: vec![0; p.replicas],
                down_until: 0,
            },
            meta: MetaStore {
                gen: 0,
                al: RegionSet::new(),
                bitmaps: vec![RegionSet::new(); p.replicas],
            },
            net: Vec::new(),
            inbox: VecDeque::new(),
            model: Model::new(p.blocks),
            reads: BTreeMap::new(),
            next_handle: 0,
            next_session: 0,
            report: SimReport {
                seed: p.seed,
                ..Default::default()
            },
            violation: None,
            phase: RunPhase::Faults,
            final_flushed: false,
            p,
        }
    }

    pub fn fail(&mut self, check: &'static str, detail: String) {
        if self.violation.is_none() {
            self.violation = Some(Violation {
                seed: self.p.seed,
                at_ms: self.now,
                check,
                detail,
            });
        }
    }

    pub fn run(mut self) -> Result<SimReport, Violation> {
        self.takeover();
        let limit = self.p.fault_ms + self.p.heal_limit_ms;
        while self.now < limit {
            self.now += 1;
            if self.now <= self.p.fault_ms {
                self.inject_faults();
            } else if self.phase == RunPhase::Faults {
                self.heal();
            }
            self.step();
            if let Some(v) = self.violation.take() {
                return Err(v);
            }
            if self.advance_run_phase() {
                return self.final_checks();
            }
        }
        let status = self.atts[self.cur].core.status();
        let pending = self.atts[self.cur].core.debug_pending();
        let detail = format!(
            "no convergence {} ms after the faults ended: {status:?}\n{pending}",
            self.p.heal_limit_ms
        );
        Err(Violation {
            seed: self.p.seed,
            at_ms: self.now,
            check: "G4",
            detail,
        })
    }

    /// One simulated millisecond.
    fn step(&mut self) {
        for r in 0..self.reps.len() {
            if !self.reps[r].alive && self.now >= self.reps[r].restart_at {
                self.reps[r].alive = true;
            }
        }
        for a in 0..self.atts.len() {
            if let AttState::Paused { until } = self.atts[a].state {
                if self.now >= until {
                    self.atts[a].state = AttState::Running;
                    for ev in std::mem::take(&mut self.atts[a].deferred) {
                        self.inbox.push_back((a, ev));
                    }
                }
            }
            if self.atts[a].lease_lost_at.is_some_and(|t| self.now >= t) {
                self.atts[a].lease_lost_at = None;
                self.inbox.push_back((a, Event::LeaseLost));
            }
        }
        self.drain_inbox();
        self.deliver_due();
        self.reconnect();
        self.drain_inbox();
        self.drive_clients();
        self.drain_inbox();
        if self.phase == RunPhase::Faults {
            self.check_in_sync_durable("now");
        }
        if matches!(
            self.atts[self.cur].state,
            AttState::Stopped | AttState::Crashed
        ) {
            self.takeover();
        }
    }

    fn drive_clients(&mut self) {
        let issuing = matches!(self.phase, RunPhase::Faults | RunPhase::Heal);
        for a in 0..self.atts.len() {
            if self.atts[a].state != AttState::Running {
                continue;
            }
            self.inbox.push_back((a, Event::Tick { now_ms: self.now }));
            for r in 0..self.reps.len() {
                if self.rng.chance(500_000) {
                    self.inbox.push_back((
                        a,
                        Event::ResyncCredit {
                            replica: ReplicaId(r as u64),
                        },
                    ));
                }
            }
            if issuing || a != self.cur {
                let bs = self.p.block_size;
                if let Some(ev) = self.atts[a]
                    .client
                    .issue(&mut self.rng, &mut self.model, bs)
                {
                    self.inbox.push_back((a, ev));
                }
            }
        }
    }

    /// Moves the end game along; true when the final flush succeeded.
    fn advance_run_phase(&mut self) -> bool {
        let att = &self.atts[self.cur];
        let zombies = self.atts.iter().enumerate().any(|(i, a)| {
            i != self.cur && matches!(a.state, AttState::Running | AttState::Paused { .. })
        });
        let st = att.core.status();
        let in_sync = att.state == AttState::Running
            && st.serving
            && !zombies
            && st.replicas.iter().all(|r| r.state == ReplicaState::InSync);
        match self.phase {
            RunPhase::Faults => {}
            RunPhase::Heal if in_sync => self.phase = RunPhase::Draining,
            RunPhase::Heal => {}
            RunPhase::Draining if !in_sync => self.phase = RunPhase::Heal,
            RunPhase::Draining if att.client.outstanding() == 0 => {
                let a = self.cur;
                let req = self.atts[a].client.next_req();
                let ev = self.atts[a].client.flush(req);
                self.final_flushed = false;
                self.phase = RunPhase::Final(req);
                self.inbox.push_back((a, ev));
                self.drain_inbox();
            }
            RunPhase::Draining => {}
            RunPhase::Final(_) if self.final_flushed => return true,
            RunPhase::Final(_) if !in_sync || att.client.outstanding() == 0 => {
                self.phase = RunPhase::Heal
            }
            RunPhase::Final(_) => {}
        }
        false
    }

    /// A client reply for attachment `a` arrived; notes the final flush.
    pub fn note_flush_ok(&mut self, a: usize, req: RequestId) {
        if a == self.cur && self.phase == RunPhase::Final(req) {
            self.final_flushed = true;
        }
    }

    fn final_checks(mut self) -> Result<SimReport, Violation> {
        let first = self.reps[0].durable.clone();
        for (r, rep) in self.reps.iter().enumerate() {
            if !rep.cache.is_empty() {
                let detail = format!("replica {r} has unflushed blocks after the final flush");
                return Err(Violation {
                    seed: self.p.seed,
                    at_ms: self.now,
                    check: "G1",
                    detail,
                });
            }
            if let Err(e) = self.model.check_view(&rep.durable) {
                let detail = format!("replica {r} at the end: {e}");
                return Err(Violation {
                    seed: self.p.seed,
                    at_ms: self.now,
                    check: "G1",
                    detail,
                });
            }
            if let Some(b) = (0..first.len()).find(|b| rep.durable[*b] != first[*b]) {
                let detail = format!(
                    "replicas 0 and {r} differ at block {b} ({} vs {}) after healing",
                    first[b], rep.durable[b]
                );
                return Err(Violation {
                    seed: self.p.seed,
                    at_ms: self.now,
                    check: "G4",
                    detail,
                });
            }
        }
        self.report.elapsed_ms = self.now;
        Ok(self.report)
    }

    fn heal(&mut self) {
        self.phase = RunPhase::Heal;
        self.catalog.down_until = 0;
        for rep in &mut self.reps {
            rep.restart_at = rep.restart_at.min(self.now);
            rep.fail_next_io = false;
            rep.slow_until = 0;
        }
        let (now, cur) = (self.now, self.cur);
        for (i, att) in self.atts.iter_mut().enumerate() {
            att.cut_until.iter_mut().for_each(|t| *t = 0);
            att.catalog_cut_until = 0;
            if let AttState::Paused { until } = &mut att.state {
                *until = (*until).min(now + 10);
            }
            if i != cur && matches!(att.state, AttState::Running | AttState::Paused { .. }) {
                att.lease_lost_at = Some(now + 20);
            }
        }
    }

    /// Per millisecond, each fault with its own small probability.
    fn inject_faults(&mut self) {
        let n = self.reps.len();
        let cur = self.cur;
        if self.rng.chance(2_500 * n as u64) {
            let r = self.rng.below(n as u64) as usize;
            if self.reps[r].alive {
                self.crash_replica(r);
            }
        }
        if self.rng.chance(2_500 * n as u64) {
            let r = self.rng.below(n as u64) as usize;
            self.report.partitions += 1;
            self.trace(|| format!("a{cur} partitioned from replica {r}"));
            self.atts[cur].cut_until[r] = self.now + self.rng.range(10, 400);
            self.close_conn(cur, r, "partitioned");
        }
        if self.rng.chance(1_500 * n as u64) {
            let r = self.rng.below(n as u64) as usize;
            self.reps[r].fail_next_io = true;
        }
        if self.rng.chance(2_000) {
            let r = self.rng.below(n as u64) as usize;
            self.reps[r].slow_until = self.now + self.rng.range(50, 300);
        }
        if self.rng.chance(1_500) {
            self.report.catalog_outages += 1;
            self.catalog.down_until = self.now + self.rng.range(20, 600);
        }
        if self.rng.chance(1_500) {
            self.atts[cur].catalog_cut_until = self.now + self.rng.range(20, 600);
        }
        if self.rng.chance(1_000) && self.atts[cur].state == AttState::Running {
            // A clean detach's first step (regions cool without a hot time); the client
            // goes on writing, so the log empties and refills under load.
            self.report.quiesces += 1;
            self.trace(|| format!("attachment a{cur} quiesces"));
            self.inbox.push_back((cur, Event::Quiesce));
        }
        if self.report.takeovers < MAX_FAULT_TAKEOVERS && self.atts[cur].state == AttState::Running
        {
            if self.rng.chance(800) {
                self.crash_attachment(cur);
                self.takeover();
            } else if self.rng.chance(500) {
                // A stalled host: its lease lapses, another takes over, then it wakes up.
                let until = self.now + self.rng.range(100, 800);
                self.trace(|| format!("attachment a{cur} pauses until {until}"));
                self.atts[cur].state = AttState::Paused { until };
                self.atts[cur].lease_lost_at = Some(until + self.rng.range(0, 300));
                self.takeover();
            }
        }
        self.drain_inbox();
    }

    pub fn trace(&self, what: impl FnOnce() -> String) {
        if self.p.trace {
            eprintln!("{:>6} !! {}", self.now, what());
        }
    }

    pub fn crash_replica(&mut self, r: usize) {
        self.trace(|| format!("replica {r} crashes"));
        self.report.replica_crashes += 1;
        let rep = &mut self.reps[r];
        rep.alive = false;
        rep.lose_cache(&mut self.rng);
        rep.restart_at = self.now + self.rng.range(10, 300);
        for a in 0..self.atts.len() {
            self.close_conn(a, r, "replica crashed");
        }
    }

    /// The attachment's host dies: requests already on the wire may or may not land.
    fn crash_attachment(&mut self, a: usize) {
        self.trace(|| format!("attachment a{a} crashes"));
        self.atts[a].state = AttState::Crashed;
        let msgs = std::mem::take(&mut self.net);
        for m in msgs {
            if m.att != a {
                self.net.push(m);
                continue;
            }
            match m.body {
                Body::ToReplica { r, session, req } if self.rng.chance(500_000) => {
                    self.replica_handle(a, r, session, req);
                }
                Body::ToMeta { batch, changes } if self.rng.chance(500_000) => {
                    self.meta_persist(a, batch, changes);
                }
                Body::ToCatalog { .. } => self.net.push(m),
                _ => {}
            }
        }
        for r in 0..self.reps.len() {
            self.atts[a].conns[r] = None;
        }
        self.atts[a].copies.clear();
    }

    /// A new attachment at the next generation, started from the catalog and the persisted
    /// metadata (what a failover does). Checks G1 first.
    pub fn takeover(&mut self) {
        self.trace(|| {
            format!(
                "takeover; catalog {:?}, meta al {:?}, floor {:?}",
                self.catalog, self.meta.al, self.model.floor
            )
        });
        let prev = self.catalog.generation;
        self.catalog.generation += 1;
        let g = self.catalog.generation;
        self.meta.gen = g;
        if !self.atts.is_empty() {
            self.report.takeovers += 1;
        }
        self.check_in_sync_durable(&format!("at takeover to generation {g}"));
        let replicas = (0..self.reps.len())
            .map(|r| ReplicaInit {
                id: ReplicaId(r as u64),
                local: false,
                in_sync: self.catalog.in_sync[r],
                last_in_sync_generation: Generation(if self.catalog.in_sync[r] {
                    prev
                } else {
                    self.catalog.last_in_sync_gen[r]
                }),
                dirty: self.meta.bitmaps[r].clone(),
            })
            .collect::<Vec<_>>();
        let mut replicas = replicas;
        let local = self.rng.below(self.reps.len() as u64) as usize;
        replicas[local].local = true;
        let init = AttachInit {
            generation: Generation(g),
            replicas,
            previous_activity_log: self.meta.al.clone(),
            now_ms: self.now,
        };
        let n = self.reps.len();
        self.atts.push(Att {
            gen: Generation(g),
            core: Replicator::new(self.sim_config(), init),
            state: AttState::Running,
            client: Client::default(),
            copies: BTreeMap::new(),
            conns: vec![None; n],
            cut_until: vec![0; n],
            reconnect_at: vec![0; n],
            catalog_cut_until: 0,
            lease_lost_at: None,
            deferred: Vec::new(),
            was_serving: false,
        });
        self.cur = self.atts.len() - 1;
    }

    fn sim_config(&self) -> Config {
        let bs = self.p.block_size;
        let mut cfg = Config::new(self.p.blocks as u64 * bs);
        cfg.region_size_bytes = self.p.region_blocks * bs;
        cfg.min_in_sync = self.p.min_in_sync;
        cfg.max_active_regions = 6;
        cfg.al_hot_ms = 20;
        cfg.catalog_retry_ms = 30;
        cfg.connect_timeout_ms = 200;
        cfg.rules = self.p.rules;
        cfg
    }

    /// G1: every replica the catalog lists as in sync holds, in its durable store alone,
    /// every write acknowledged durable. Holds at every instant: a flush is acknowledged
    /// only after every replica the catalog may count made it durable, and a replica enters
    /// the catalog's set only after its barrier flush.
    fn check_in_sync_durable(&mut self, when: &str) {
        for r in 0..self.reps.len() {
            if self.catalog.in_sync[r] {
                if let Err(e) = self.model.check_view(&self.reps[r].durable) {
                    self.fail("G1", format!("in-sync replica {r} {when}: {e}"));
                }
            }
        }
    }

    /// Connects every running attachment to every reachable replica it is not connected to.
    fn reconnect(&mut self) {
        for a in 0..self.atts.len() {
            if self.atts[a].state != AttState::Running {
                continue;
            }
            for r in 0..self.reps.len() {
                let att = &self.atts[a];
                let rep = &self.reps[r];
                if att.conns[r].is_some()
                    || !rep.alive
                    || self.now < att.cut_until[r]
                    || self.now < att.reconnect_at[r]
                {
                    continue;
                }
                if att.gen.0 < rep.highest_gen {
                    // Handshake refused: STALE_GENERATION.
                    let highest = Generation(rep.highest_gen);
                    self.atts[a].reconnect_at[r] = self.now + 50;
                    self.inbox.push_back((a, Event::Fenced { highest }));
                    continue;
                }
                // Admit: raise the fence, reopen the replica if it was fail-stopped.
                let rep = &mut self.reps[r];
                rep.highest_gen = att.gen.0;
                rep.faulted = false;
                self.next_session += 1;
                let session = SessionId(self.next_session);
                self.atts[a].conns[r] = Some(session);
                self.inbox.push_back((
                    a,
                    Event::ReplicaUp {
                        replica: ReplicaId(r as u64),
                        session,
                    },
                ));
            }
        }
    }

    /// Feeds queued events to their attachments, performing the effects.
    pub fn drain_inbox(&mut self) {
        while let Some((a, ev)) = self.inbox.pop_front() {
            match self.atts[a].state {
                AttState::Paused { .. } => {
                    self.atts[a].deferred.push(ev);
                    continue;
                }
                AttState::Crashed | AttState::Stopped => continue,
                AttState::Running => {}
            }
            if self.p.trace && !matches!(ev, Event::Tick { .. } | Event::ResyncCredit { .. }) {
                eprintln!("{:>6} a{a} <- {ev:?}", self.now);
            }
            let mut out = Vec::new();
            self.atts[a].core.apply(ev, &mut out);
            for e in out {
                if self.p.trace {
                    eprintln!("{:>6} a{a} -> {e:?}", self.now);
                }
                self.perform(a, e);
            }
            self.check_serving(a);
        }
    }

    /// G5: the moment an attachment starts serving, its in-sync replicas agree everywhere.
    /// (Only for the newest attachment: a superseded one that wakes up may start "serving"
    /// on replicas the new one is writing to; everything it sends is fenced.)
    fn check_serving(&mut self, a: usize) {
        if a != self.cur || self.atts[a].was_serving || !self.atts[a].core.is_serving() {
            return;
        }
        self.atts[a].was_serving = true;
        let st = self.atts[a].core.status();
        let in_sync: Vec<usize> = st
            .replicas
            .iter()
            .filter(|r| r.state == ReplicaState::InSync)
            .map(|r| r.id.0 as usize)
            .collect();
        let Some(&first) = in_sync.first() else {
            return;
        };
        let base = self.reps[first].view();
        for &r in &in_sync[1..] {
            let v = self.reps[r].view();
            if let Some(b) = (0..base.len()).find(|b| base[*b] != v[*b]) {
                let detail = format!(
                    "generation {} serves with in-sync replicas {first} and {r} differing at block {b} ({} vs {})",
                    self.atts[a].gen, base[b], v[b]
                );
                self.fail("G5", detail);
                return;
            }
        }
    }
}
