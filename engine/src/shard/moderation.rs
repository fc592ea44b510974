//! Load-adaptive wake-up moderation: under sustained load a shard naps a
//! few microseconds between turns, so that one wake-up finds a batch of
//! completions instead of one; at light load and when idle it never does.
//!
//! Two known controllers are combined:
//!
//! - **IRQ suspension** (Linux 6.13, Karsten and Damato) decides each turn:
//!   the shard pauses only after two turns in a row found work, and the
//!   first pause that finds nothing reverts it to immediate wake-ups (the
//!   next waits block as before). Consecutive empty pauses double how many
//!   turns go by before the next one is tried.
//! - **net DIM** (`lib/dim/net_dim.c`) chooses the pause length: it samples
//!   windows of `WINDOW_WORK` (2048) units of work and compares each window with
//!   the one before on throughput (work per wall-clock time) and on cost
//!   (the shard thread's CPU time per unit of work), with a 10%
//!   significance band (better: one better and neither worse); it climbs a ladder of pause lengths (off, then
//!   `max_pause`/8, /4, /2, `max_pause`) while each step is better, steps
//!   back and parks when one is not, and re-explores after a park whose
//!   length doubles each time an exploration found nothing (or at once when
//!   two windows in a row show the load moved by more than a ladder step,
//!   2×). Leaving a park it
//!   first tries a shorter pause (kept if not worse), as net DIM does.
//!
//! Nothing is explored while the load is too light for a pause to pay: a
//! nap is a wake-up itself (its timer's), so from off the controller
//! explores only when at least two wake-ups came per longest pause; and
//! when not even one more unit of work would arrive during the longest
//! pause, it goes back off from any rung.
//!
//! The controller is pure logic: it is handed each turn's work count and,
//! at the end of a window, the clocks (the shard reads them), so its
//! decisions are deterministic and tested as such.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::Coalesce;

/// How a shard moderates its wake-ups (see [`crate::ListenerBuilder::moderation`]).
///
/// ```
/// use std::time::Duration;
/// use floodgate::{Listener, Moderation};
///
/// let listener = Listener::builder("127.0.0.1:0".parse()?)
///     .shards(1)
///     .moderation(Moderation::Adaptive { max_pause: Duration::from_micros(32) })
///     .build()?;
/// # drop(listener);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moderation {
    /// Never pause: every wait returns at the first completion.
    Off,
    /// Pause between turns under sustained load, never longer than
    /// `max_pause`; the length is found by measurement (module docs of
    /// `shard::moderation`, PERF.md). The default, with 64 µs.
    Adaptive {
        /// The longest pause (the top of the ladder). Zero means off.
        max_pause: Duration,
    },
    /// A fixed rule: pause `pause` after a turn that accepted at least
    /// `threshold` connections (listeners only; connector shards treat it
    /// as off).
    Fixed(Coalesce),
}

impl Default for Moderation {
    /// `Adaptive` with a 64 µs ceiling (the top of net DIM's RX profiles).
    fn default() -> Self {
        Moderation::Adaptive {
            max_pause: DEFAULT_MAX_PAUSE,
        }
    }
}

/// The default ceiling of an adaptive pause.
pub const DEFAULT_MAX_PAUSE: Duration = Duration::from_micros(64);

/// Units of work (service completions) in one sample window.
pub(crate) const WINDOW_WORK: u64 = 2048;

/// Rungs of the ladder: off, then max/8, max/4, max/2, max.
const LEVELS: usize = 5;

/// Significance band of a comparison, in percent.
const SIGNIFICANT_PCT: u64 = 10;

/// Windows a first park lasts, and the longest park.
const MIN_PARK: u32 = 4;
const MAX_PARK: u32 = 256;

/// Longest run of turns without a pause after empty pauses.
const MAX_SUSPEND: u32 = 64;

/// A shard's moderation counters (in [`crate::ShardStats::moderation`] and
/// [`crate::ConnectShardStats::moderation`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct ModerationStats {
    /// Pauses taken between turns (adaptive or fixed).
    pub pauses: u64,
    /// Pauses after which no work was there: each one reverted the shard to
    /// immediate wake-ups.
    pub empty_pauses: u64,
    /// Time spent in pauses, in microseconds.
    pub paused_us: u64,
    /// The adaptive controller's pause length now, in microseconds (0: it
    /// does not pause at this load).
    pub level_us: u64,
}

impl ModerationStats {
    /// Adds `other`'s counters (the level is the larger).
    pub fn add(&mut self, other: &ModerationStats) {
        self.pauses += other.pauses;
        self.empty_pauses += other.empty_pauses;
        self.paused_us += other.paused_us;
        self.level_us = self.level_us.max(other.level_us);
    }
}

/// The live counters behind [`ModerationStats`], written by the shard's thread.
#[derive(Debug, Default)]
pub(crate) struct ModerationCounters {
    pub pauses: AtomicU64,
    pub empty_pauses: AtomicU64,
    pub paused_ns: AtomicU64,
    pub level_ns: AtomicU64,
}

impl ModerationCounters {
    pub fn snapshot(&self) -> ModerationStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ModerationStats {
            pauses: g(&self.pauses),
            empty_pauses: g(&self.empty_pauses),
            paused_us: g(&self.paused_ns) / 1000,
            level_us: g(&self.level_ns) / 1000,
        }
    }

    /// Only the shard's thread writes: a load and a store, no RMW.
    pub fn add(c: &AtomicU64, n: u64) {
        c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
    }
}

/// What a window measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Sample {
    /// Work per second of wall-clock time.
    pub rate: f64,
    /// Shard-thread CPU nanoseconds per unit of work.
    pub cost: f64,
    /// Turns that found work (wake-ups) per second.
    pub wakes: f64,
}

/// How one window compares with the one before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Better,
    Same,
    Worse,
}

/// Better when one of throughput (in a closed loop a pause that helps the
/// clients shows as more work per second; one that delays them as less)
/// and cost (CPU per unit of work) is significantly better and the other
/// not significantly worse; worse when either is significantly worse.
pub(crate) fn compare(curr: Sample, prev: Sample) -> Verdict {
    let up = |a: f64, b: f64| a * 100.0 > b * (100 + SIGNIFICANT_PCT) as f64;
    // +1 significantly better, -1 significantly worse, 0 the same.
    let sign = |better: bool, worse: bool| i8::from(better) - i8::from(worse);
    let rate = sign(up(curr.rate, prev.rate), up(prev.rate, curr.rate));
    let cost = sign(up(prev.cost, curr.cost), up(curr.cost, prev.cost));
    if rate < 0 || cost < 0 {
        Verdict::Worse
    } else if rate > 0 || cost > 0 {
        Verdict::Better
    } else {
        Verdict::Same
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Measuring the current rung against `prev`, moving by `dir` (+1
    /// longer pauses, -1 shorter).
    Exploring { dir: i8, from: usize },
    /// Holding the current rung for `left` more windows.
    Parked { left: u32 },
}

/// One shard's adaptive controller.
#[derive(Debug, Clone)]
pub(crate) struct Controller {
    ladder: [Duration; LEVELS],
    level: usize,
    state: State,
    park_len: u32,
    /// The window before, for the comparison.
    prev: Option<Sample>,
    /// The window the current park started on (load-change test).
    parked_on: Option<Sample>,
    /// Consecutive parked windows whose rate moved by more than 2×.
    moved: u32,
    /// Work in the current window, and the turns that found it.
    work: u64,
    turns: u64,
    /// Consecutive turns that found work.
    streak: u32,
    /// Turns left without a pause after an empty one, and the next length.
    suspend: u32,
    suspend_len: u32,
}

impl Controller {
    /// A controller whose longest pause is `max_pause` (zero: never pauses).
    pub fn new(max_pause: Duration) -> Self {
        let ladder = [
            Duration::ZERO,
            max_pause / 8,
            max_pause / 4,
            max_pause / 2,
            max_pause,
        ];
        Controller {
            ladder,
            level: 0,
            state: State::Parked { left: 0 },
            park_len: MIN_PARK,
            prev: None,
            parked_on: None,
            moved: 0,
            work: 0,
            turns: 0,
            streak: 0,
            suspend: 0,
            suspend_len: 1,
        }
    }

    fn top(&self) -> usize {
        if self.ladder[LEVELS - 1].is_zero() {
            0
        } else {
            LEVELS - 1
        }
    }

    /// The pause length now chosen (zero: off).
    pub fn level(&self) -> Duration {
        self.ladder[self.level]
    }

    /// After a turn that handled `work` completions; `paused` says whether
    /// its wait was a pause. Returns the pause before the next wait, if any,
    /// and whether the window is full (then call [`Controller::window`]).
    pub fn turn(&mut self, work: usize, paused: bool) -> (Option<Duration>, bool) {
        self.work += work as u64;
        let full = self.work >= WINDOW_WORK;
        if work == 0 {
            self.streak = 0;
            if paused {
                // IRQ suspension's rule: the first empty pause ends it.
                self.suspend = self.suspend_len;
                self.suspend_len = (self.suspend_len * 2).min(MAX_SUSPEND);
            }
            return (None, full);
        }
        self.turns += 1;
        if paused {
            self.suspend_len = 1;
        }
        self.streak = self.streak.saturating_add(1);
        if self.suspend > 0 {
            self.suspend -= 1;
            return (None, full);
        }
        let pause = self.ladder[self.level];
        if self.streak < 2 || pause.is_zero() {
            return (None, full);
        }
        (Some(pause), full)
    }

    /// Closes a window that took `wall_ns` of wall-clock time and `cpu_ns`
    /// of the shard thread's CPU time, and decides the next rung.
    pub fn window(&mut self, wall_ns: u64, cpu_ns: u64) {
        let work = std::mem::take(&mut self.work).max(1);
        let turns = std::mem::take(&mut self.turns);
        let per_s = |n: u64| n as f64 * 1e9 / wall_ns.max(1) as f64;
        let s = Sample {
            rate: per_s(work),
            cost: cpu_ns as f64 / work as f64,
            wakes: per_s(turns),
        };
        self.decide(s);
    }

    /// One window's decision.
    pub(crate) fn decide(&mut self, s: Sample) {
        let top = self.top();
        // Too light for a pause to batch: within the longest pause not one
        // more unit would arrive. Off, without probing.
        let expected = s.rate * self.ladder[top].as_secs_f64();
        if top == 0 || expected < 1.0 {
            self.level = 0;
            self.state = State::Parked { left: 0 };
            self.prev = None;
            self.parked_on = None;
            return;
        }
        match self.state {
            State::Parked { left } => {
                // A load change (two windows in a row off by more than a
                // ladder step, 2×, so that one noisy window is not one)
                // ends the park and the doubling.
                let off = self.parked_on.is_some_and(|p| {
                    let r = s.rate / p.rate;
                    !(0.5..=2.0).contains(&r)
                });
                self.moved = if off { self.moved + 1 } else { 0 };
                let moved = self.moved >= 2;
                if moved {
                    self.park_len = MIN_PARK;
                    self.moved = 0;
                }
                if left > 0 && !moved {
                    self.state = State::Parked { left: left - 1 };
                    return;
                }
                // From off, explore only if a pause could pay: a nap is a
                // wake-up itself (its timer's), so it saves something only
                // if at least two wake-ups would have come within the
                // longest one. Below that (a few clients, an open loop of
                // one connection per wake-up) it stays off and probes
                // nothing.
                if self.level == 0 && s.wakes * self.ladder[top].as_secs_f64() < 2.0 {
                    self.state = State::Parked { left: 0 };
                    self.parked_on = Some(s);
                    return;
                }
                // Explore from here as net DIM leaves a park: towards
                // shorter pauses from any rung but off, so that noise that
                // lifted the level is undone first and a shorter pause
                // that does as well wins.
                let dir = if self.level == 0 { 1 } else { -1 };
                self.prev = Some(s);
                self.state = State::Exploring {
                    dir,
                    from: self.level,
                };
                self.step(dir);
            }
            State::Exploring { dir, from } => {
                let prev = self.prev.unwrap_or(s);
                let v = compare(s, prev);
                // Longer pauses must pay; shorter ones need only not cost.
                let keep = match dir {
                    1 => v == Verdict::Better,
                    _ => v != Verdict::Worse,
                };
                if keep {
                    self.prev = Some(s);
                    let next = self.level as isize + dir as isize;
                    if (0..=top as isize).contains(&next) {
                        self.step(dir);
                    } else {
                        self.park(from, s);
                    }
                } else {
                    // Back to the rung before, which was at least as good.
                    self.step(-dir);
                    self.park(from, prev);
                }
            }
        }
    }

    fn step(&mut self, dir: i8) {
        let next = (self.level as isize + dir as isize).clamp(0, self.top() as isize);
        self.level = next as usize;
    }

    fn park(&mut self, from: usize, on: Sample) {
        if self.level == from {
            // The exploration found nothing: look again later each time.
            self.park_len = (self.park_len * 2).min(MAX_PARK);
        } else {
            self.park_len = MIN_PARK;
        }
        self.state = State::Parked {
            left: self.park_len,
        };
        self.parked_on = Some(on);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_micros(64);

    /// A window of one unit of work per wake-up.
    fn s(rate: f64, cost: f64) -> Sample {
        Sample {
            rate,
            cost,
            wakes: rate,
        }
    }

    /// A controller that a load rising 20% per window has walked up the
    /// ladder to `MAX`, and the last window's rate.
    fn climbed_to_the_top() -> (Controller, f64) {
        let mut c = Controller::new(MAX);
        let mut rate = 500_000.0;
        c.decide(s(rate, 5000.0));
        for _ in 0..4 {
            rate *= 1.2;
            c.decide(s(rate, 5000.0));
        }
        assert_eq!(c.level(), MAX);
        (c, rate)
    }

    /// Feeds turns of `work` each (none paused) until a window is full.
    fn fill(c: &mut Controller, work: usize) -> Vec<Option<Duration>> {
        let mut out = Vec::new();
        loop {
            let (p, full) = c.turn(work, false);
            out.push(p);
            if full {
                return out;
            }
        }
    }

    #[test]
    fn starts_off_and_never_pauses_at_level_zero() {
        let mut c = Controller::new(MAX);
        assert_eq!(c.level(), Duration::ZERO);
        assert!(fill(&mut c, 3).iter().all(Option::is_none));
    }

    #[test]
    fn sustained_load_that_pays_climbs_to_the_top_and_pauses() {
        let mut c = Controller::new(MAX);
        // Heavy load (500k work/s: 32 units per longest pause); every
        // longer pause raises throughput by 20%.
        let mut rate = 500_000.0;
        c.decide(s(rate, 5000.0));
        assert_eq!(c.level(), MAX / 8, "explores upwards first");
        for _ in 0..3 {
            rate *= 1.2;
            c.decide(s(rate, 5000.0));
        }
        assert_eq!(c.level(), MAX, "each better step goes on");
        rate *= 1.2;
        c.decide(s(rate, 5000.0));
        assert_eq!(c.level(), MAX, "parks on top");
        let pauses = fill(&mut c, 2);
        assert_eq!(pauses[0], None, "a pause needs two turns with work");
        assert!(pauses[1..].iter().all(|p| *p == Some(MAX)));
    }

    #[test]
    fn a_step_that_does_not_pay_is_taken_back() {
        let mut c = Controller::new(MAX);
        c.decide(s(500_000.0, 5000.0));
        assert_eq!(c.level(), MAX / 8);
        // Same throughput, same cost: not better, back off and park.
        c.decide(s(505_000.0, 5050.0));
        assert_eq!(c.level(), Duration::ZERO);
        assert!(matches!(c.state, State::Parked { .. }));
    }

    #[test]
    fn a_pause_that_costs_throughput_is_taken_back() {
        // A closed loop with few clients: a pause delays them all.
        let mut c = Controller::new(MAX);
        c.decide(s(60_000.0, 9000.0));
        assert_eq!(c.level(), MAX / 8);
        c.decide(s(45_000.0, 8000.0));
        assert_eq!(c.level(), Duration::ZERO);
    }

    #[test]
    fn cheaper_at_the_same_throughput_is_better() {
        // An open loop: throughput is the arrival rate; lower cost pays.
        let mut c = Controller::new(MAX);
        c.decide(s(100_000.0, 8000.0));
        c.decide(s(100_000.0, 6000.0));
        assert_eq!(c.level(), MAX / 4, "kept climbing");
    }

    #[test]
    fn parks_longer_each_time_exploring_finds_nothing() {
        let mut c = Controller::new(MAX);
        let base = s(500_000.0, 5000.0);
        let mut parks = Vec::new();
        for _ in 0..5 {
            c.decide(base); // explore: one rung up
            assert_eq!(c.level(), MAX / 8);
            c.decide(base); // not better: back, park
            assert_eq!(c.level(), Duration::ZERO);
            let State::Parked { left } = c.state else {
                panic!("parked")
            };
            parks.push(left);
            for _ in 0..left {
                c.decide(base);
                assert_eq!(c.level(), Duration::ZERO, "no probing while parked");
            }
        }
        assert_eq!(parks, vec![8, 16, 32, 64, 128]);
        c.decide(base);
        c.decide(base);
        assert_eq!(c.state, State::Parked { left: MAX_PARK });
    }

    #[test]
    fn a_load_change_ends_a_park() {
        let mut c = Controller::new(MAX);
        c.decide(s(500_000.0, 5000.0));
        c.decide(s(500_000.0, 5000.0));
        assert!(matches!(c.state, State::Parked { left } if left > 1));
        // Three times the load for one window: noise, still parked.
        c.decide(s(1_500_000.0, 5000.0));
        assert_eq!(c.level(), Duration::ZERO);
        c.decide(s(500_000.0, 5000.0));
        c.decide(s(1_500_000.0, 5000.0));
        assert_eq!(c.level(), Duration::ZERO);
        // Two in a row: the load moved, explore at once.
        c.decide(s(1_500_000.0, 5000.0));
        assert_eq!(c.level(), MAX / 8);
    }

    #[test]
    fn on_top_it_explores_downwards_and_keeps_a_shorter_pause_that_costs_nothing() {
        let (mut c, rate) = climbed_to_the_top();
        let State::Parked { left } = c.state else {
            panic!("parked")
        };
        for _ in 0..left {
            c.decide(s(rate, 5000.0));
        }
        c.decide(s(rate, 5000.0));
        assert_eq!(c.level(), MAX / 2, "re-explores downwards from the top");
        c.decide(s(rate, 5000.0));
        assert_eq!(c.level(), MAX / 4, "as good with less: goes on down");
        c.decide(s(rate * 0.8, 5000.0));
        assert_eq!(c.level(), MAX / 2, "worse: back up one and park");
    }

    #[test]
    fn from_a_middle_rung_it_explores_shorter_pauses_first() {
        let mut c = Controller::new(MAX);
        c.level = 2;
        c.state = State::Parked { left: 0 };
        c.decide(s(500_000.0, 5000.0));
        assert_eq!(c.level(), MAX / 8, "one rung shorter");
        c.decide(s(500_000.0, 5000.0));
        assert_eq!(c.level(), Duration::ZERO, "as good: shorter again");
        c.decide(s(500_000.0, 5000.0));
        assert!(matches!(c.state, State::Parked { .. }), "off is the edge");
        assert_eq!(c.level(), Duration::ZERO);
    }

    #[test]
    fn more_throughput_at_a_higher_cost_is_worse() {
        assert_eq!(compare(s(120.0, 120.0), s(100.0, 100.0)), Verdict::Worse);
        assert_eq!(compare(s(120.0, 105.0), s(100.0, 100.0)), Verdict::Better);
        assert_eq!(compare(s(95.0, 80.0), s(100.0, 100.0)), Verdict::Better);
        assert_eq!(compare(s(85.0, 80.0), s(100.0, 100.0)), Verdict::Worse);
        assert_eq!(compare(s(105.0, 95.0), s(100.0, 100.0)), Verdict::Same);
    }

    #[test]
    fn fewer_than_two_wake_ups_per_longest_pause_never_explore() {
        let mut c = Controller::new(MAX);
        // 100k completions/s (6 per 64 µs) but 20k wake-ups/s (1.3 per
        // 64 µs): an open loop at 20k/s, each wake-up one connection.
        let w = Sample {
            rate: 100_000.0,
            cost: 5000.0,
            wakes: 20_000.0,
        };
        for _ in 0..100 {
            c.decide(w);
            assert_eq!(c.level(), Duration::ZERO);
        }
        // Twice as many wake-ups: it explores.
        c.decide(Sample {
            wakes: 40_000.0,
            ..w
        });
        assert_eq!(c.level(), MAX / 8);
    }

    #[test]
    fn light_load_is_off_without_probing() {
        let mut c = Controller::new(MAX);
        // 10k work/s: 0.64 units per 64 µs pause.
        for _ in 0..100 {
            c.decide(s(10_000.0, 5000.0));
            assert_eq!(c.level(), Duration::ZERO);
        }
    }

    #[test]
    fn load_falling_light_switches_it_off() {
        let (mut c, _) = climbed_to_the_top();
        c.decide(s(1_000.0, 5000.0));
        assert_eq!(c.level(), Duration::ZERO);
        assert!(fill(&mut c, 1).iter().all(Option::is_none));
    }

    fn at_top() -> Controller {
        let mut c = Controller::new(MAX);
        c.level = LEVELS - 1;
        c.state = State::Parked { left: 64 };
        c
    }

    #[test]
    fn a_turn_without_work_never_pauses_and_resets_the_streak() {
        let mut c = at_top();
        assert_eq!(c.turn(1, false).0, None);
        assert_eq!(c.turn(1, false).0, Some(MAX));
        assert_eq!(c.turn(0, false).0, None);
        assert_eq!(c.turn(1, false).0, None, "streak starts again");
        assert_eq!(c.turn(1, false).0, Some(MAX));
    }

    #[test]
    fn the_first_empty_pause_reverts_to_immediate_wake_ups() {
        let mut c = at_top();
        c.turn(1, false);
        assert_eq!(c.turn(1, false).0, Some(MAX));
        // The pause found nothing: immediate waits, the next pause tried
        // after one turn, then two, four… while they keep finding nothing.
        assert_eq!(c.turn(0, true).0, None);
        let mut gaps = Vec::new();
        for _ in 0..4 {
            let mut n = 0;
            loop {
                let (p, _) = c.turn(1, false);
                if p.is_some() {
                    break;
                }
                n += 1;
            }
            gaps.push(n);
            assert_eq!(c.turn(0, true).0, None);
        }
        assert_eq!(gaps, vec![1, 2, 4, 8]);
        // A pause that finds work resets the back-off.
        c.turn(1, false);
        c.turn(1, false);
        let mut n = 0;
        while c.turn(1, false).0.is_none() {
            n += 1;
        }
        assert!(n >= 1);
        assert_eq!(c.turn(3, true).0, Some(MAX));
        assert_eq!(c.turn(0, true).0, None);
        assert_eq!(c.turn(1, false).0, None);
        assert_eq!(c.turn(1, false).0, Some(MAX), "back-off started again at 1");
    }

    #[test]
    fn zero_max_pause_is_off() {
        let mut c = Controller::new(Duration::ZERO);
        for _ in 0..10 {
            c.decide(s(10_000_000.0, 100.0));
            assert_eq!(c.level(), Duration::ZERO);
        }
        assert!(fill(&mut c, 8).iter().all(Option::is_none));
    }

    #[test]
    fn never_pauses_longer_than_max_pause() {
        let max = Duration::from_micros(20);
        let mut c = Controller::new(max);
        let mut rate = 5_000_000.0;
        for _ in 0..50 {
            rate *= 1.2;
            c.decide(s(rate, 100.0));
            assert!(c.level() <= max);
        }
        for _ in 0..10 {
            let (p, _) = c.turn(4, false);
            assert!(p.is_none_or(|p| p <= max));
        }
    }

    #[test]
    fn windows_close_after_the_work_they_hold() {
        let mut c = Controller::new(MAX);
        let turns = fill(&mut c, 8).len();
        assert_eq!(turns as u64, WINDOW_WORK / 8);
        c.window(1_000_000, 500_000);
        let turns = fill(&mut c, 8).len();
        assert_eq!(turns as u64, WINDOW_WORK / 8, "the count starts again");
    }
}
