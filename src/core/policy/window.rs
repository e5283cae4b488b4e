//! Promotion windows: days and local times in an IANA time zone (jiff's bundled tz database) when a
//! canary may gain weight or promote. Outside them it waits, and says when the next one opens.

use std::fmt;

use jiff::civil::{Date, Time, Weekday as CivilWeekday};
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan, Zoned};

use super::{PromotionWindow, Weekday};

/// The windows of one policy, read and with their time zones looked up. Empty: always open.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PromotionWindows {
    windows: Vec<Window>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Window {
    days: Vec<CivilWeekday>,
    start: Time,
    /// `None`: `24:00`, the end of the day.
    end: Option<Time>,
    zone: TimeZone,
}

/// A window that cannot be used, with its place.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{at}: {why}")]
pub struct WindowError {
    pub at: String,
    pub why: String,
}

/// Whether a canary may move now, and if not, when it may.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WindowState {
    Open,
    /// Closed until this time (in the zone of the window that opens first).
    OpensAt(Zoned),
}

impl PromotionWindows {
    /// Reads the windows; `at` is the place of the list (`spec.promotionWindows`).
    pub fn read(windows: &[PromotionWindow], at: &str) -> Result<PromotionWindows, WindowError> {
        let windows = windows
            .iter()
            .enumerate()
            .map(|(i, w)| Window::read(w, &format!("{at}[{i}]")))
            .collect::<Result<_, _>>()?;
        Ok(PromotionWindows { windows })
    }

    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }

    /// Open now, or when the next window opens.
    pub fn at(&self, now: Timestamp) -> WindowState {
        let mut next: Option<Zoned> = None;
        for window in &self.windows {
            match window.next_open(now) {
                None => return WindowState::Open,
                Some(opens) => {
                    if next
                        .as_ref()
                        .is_none_or(|n| opens.timestamp() < n.timestamp())
                    {
                        next = Some(opens);
                    }
                }
            }
        }
        match next {
            Some(opens) => WindowState::OpensAt(opens),
            None => WindowState::Open,
        }
    }
}

impl Window {
    fn read(w: &PromotionWindow, at: &str) -> Result<Window, WindowError> {
        let err = |field: &str, why: String| WindowError {
            at: format!("{at}.{field}"),
            why,
        };
        let zone = TimeZone::get(&w.time_zone).map_err(|_| {
            err(
                "timeZone",
                format!(
                    "{:?} is not a time zone of the IANA database; use a name such as Europe/Berlin or UTC",
                    w.time_zone
                ),
            )
        })?;
        let start = clock(&w.start)
            .ok_or_else(|| err("start", format!("{:?} is not a time of day HH:MM", w.start)))?;
        let end = match w.end.as_str() {
            "24:00" => None,
            text => Some(
                clock(text)
                    .ok_or_else(|| err("end", format!("{text:?} is not a time of day HH:MM")))?,
            ),
        };
        if end.is_some_and(|end| end <= start) {
            return Err(err(
                "end",
                format!(
                    "{} is not after start {}; a window ends on the day it starts (end may be 24:00)",
                    w.end, w.start
                ),
            ));
        }
        if w.days.is_empty() {
            return Err(err(
                "days",
                "no days; name at least one, e.g. Mon".to_owned(),
            ));
        }
        Ok(Window {
            days: w.days.iter().map(|d| civil(*d)).collect(),
            start,
            end,
            zone,
        })
    }

    /// `None` when open at `now`, else when it next opens. A start inside a daylight-saving gap
    /// moves to the first valid time after it, and a time that occurs twice counts from its first
    /// occurrence (jiff's "compatible" rule, as RFC 5545 calendars do).
    fn next_open(&self, now: Timestamp) -> Option<Zoned> {
        let today = now.to_zoned(self.zone.clone()).date();
        // Yesterday too: a window that ends at 24:00 is still that day's, whatever the offset did.
        let mut soonest: Option<Zoned> = None;
        for offset in -1..=7i64 {
            let Ok(day) = today.checked_add(offset.days()) else {
                continue;
            };
            if !self.days.contains(&day.weekday()) {
                continue;
            }
            let (Some(opens), Some(closes)) = (self.local(day, Some(self.start)), self.close(day))
            else {
                continue;
            };
            // A start pushed past the end by a daylight-saving gap leaves nothing that day.
            if opens.timestamp() >= closes.timestamp() {
                continue;
            }
            if opens.timestamp() <= now && now < closes.timestamp() {
                return None;
            }
            if opens.timestamp() > now && soonest.is_none() {
                soonest = Some(opens);
            }
        }
        soonest
    }

    fn close(&self, day: Date) -> Option<Zoned> {
        match self.end {
            Some(end) => self.local(day, Some(end)),
            None => self.local(day.tomorrow().ok()?, None),
        }
    }

    fn local(&self, day: Date, time: Option<Time>) -> Option<Zoned> {
        day.to_datetime(time.unwrap_or(Time::midnight()))
            .to_zoned(self.zone.clone())
            .ok()
    }
}

fn clock(text: &str) -> Option<Time> {
    let (h, m) = text.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    Time::new(h.parse().ok()?, m.parse().ok()?, 0, 0).ok()
}

fn civil(day: Weekday) -> CivilWeekday {
    match day {
        Weekday::Mon => CivilWeekday::Monday,
        Weekday::Tue => CivilWeekday::Tuesday,
        Weekday::Wed => CivilWeekday::Wednesday,
        Weekday::Thu => CivilWeekday::Thursday,
        Weekday::Fri => CivilWeekday::Friday,
        Weekday::Sat => CivilWeekday::Saturday,
        Weekday::Sun => CivilWeekday::Sunday,
    }
}

impl fmt::Display for WindowState {
    /// `Mon 2026-12-07 09:00 CET (Europe/Berlin)`: local time, as the policy's author wrote it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WindowState::Open => f.write_str("open"),
            WindowState::OpensAt(z) => {
                let local = z.strftime("%a %Y-%m-%d %H:%M %Z").to_string();
                match z.time_zone().iana_name() {
                    Some(zone) if !local.ends_with(zone) => write!(f, "{local} ({zone})"),
                    _ => f.write_str(&local),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(days: &[Weekday], start: &str, end: &str, zone: &str) -> PromotionWindows {
        PromotionWindows::read(
            &[PromotionWindow {
                days: days.to_vec(),
                start: start.into(),
                end: end.into(),
                time_zone: zone.into(),
            }],
            "spec.promotionWindows",
        )
        .unwrap()
    }

    fn office() -> PromotionWindows {
        use Weekday::*;
        window(
            &[Mon, Tue, Wed, Thu, Fri],
            "09:00",
            "16:00",
            "Europe/Berlin",
        )
    }

    fn ts(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    fn opens(w: &PromotionWindows, now: &str) -> Option<Timestamp> {
        match w.at(ts(now)) {
            WindowState::Open => None,
            WindowState::OpensAt(z) => Some(z.timestamp()),
        }
    }

    #[test]
    fn office_hours_open_and_close_on_their_edges() {
        let w = office();
        // 2026-12-02 is a Wednesday; Berlin is UTC+1 in winter.
        assert_eq!(
            opens(&w, "2026-12-02T07:59:59Z"),
            Some(ts("2026-12-02T08:00:00Z"))
        );
        assert_eq!(opens(&w, "2026-12-02T08:00:00Z"), None);
        assert_eq!(opens(&w, "2026-12-02T14:59:59Z"), None);
        assert_eq!(
            opens(&w, "2026-12-02T15:00:00Z"),
            Some(ts("2026-12-03T08:00:00Z"))
        );
    }

    #[test]
    fn the_weekend_waits_for_monday() {
        let w = office();
        // Friday 16:00 Berlin, Saturday, Sunday night: all wait for Monday 09:00.
        for now in [
            "2026-12-04T15:00:00Z",
            "2026-12-05T12:00:00Z",
            "2026-12-06T22:59:59Z",
        ] {
            assert_eq!(opens(&w, now), Some(ts("2026-12-07T08:00:00Z")), "{now}");
        }
    }

    #[test]
    fn summer_time_moves_the_window_in_utc() {
        let w = office();
        // Berlin switches to CEST (UTC+2) on Sunday 2027-03-28: Friday's window opens at 08:00
        // UTC, Monday's at 07:00 UTC.
        assert_eq!(
            opens(&w, "2027-03-26T07:00:00Z"),
            Some(ts("2027-03-26T08:00:00Z"))
        );
        assert_eq!(
            opens(&w, "2027-03-27T07:00:00Z"),
            Some(ts("2027-03-29T07:00:00Z"))
        );
        assert_eq!(opens(&w, "2027-03-29T07:00:00Z"), None);
        // And back to CET on 2027-10-31.
        assert_eq!(
            opens(&w, "2027-10-30T12:00:00Z"),
            Some(ts("2027-11-01T08:00:00Z"))
        );
    }

    #[test]
    fn a_start_inside_the_spring_gap_opens_at_the_first_valid_time() {
        // 02:30 does not exist in Berlin on 2027-03-28: the window opens at 03:30 CEST (01:30 UTC).
        let w = window(&[Weekday::Sun], "02:30", "04:00", "Europe/Berlin");
        assert_eq!(
            opens(&w, "2027-03-28T00:00:00Z"),
            Some(ts("2027-03-28T01:30:00Z"))
        );
        assert_eq!(opens(&w, "2027-03-28T01:30:00Z"), None);
        assert_eq!(opens(&w, "2027-03-28T01:59:59Z"), None);
        assert_eq!(
            opens(&w, "2027-03-28T02:00:00Z"),
            Some(ts("2027-04-04T00:30:00Z"))
        );
    }

    #[test]
    fn a_repeated_hour_in_autumn_counts_from_its_first_occurrence() {
        // 02:30 happens twice in Berlin on 2027-10-31 (CEST, then CET): it opens at the first.
        let w = window(&[Weekday::Sun], "02:30", "24:00", "Europe/Berlin");
        assert_eq!(
            opens(&w, "2027-10-31T00:00:00Z"),
            Some(ts("2027-10-31T00:30:00Z"))
        );
        assert_eq!(opens(&w, "2027-10-31T22:59:59Z"), None);
        assert_eq!(
            opens(&w, "2027-10-31T23:00:00Z"),
            Some(ts("2027-11-07T01:30:00Z"))
        );
    }

    #[test]
    fn a_window_to_midnight_and_zones_east_of_utc() {
        // Tokyo, Monday until midnight: Sunday 15:00 UTC is Monday 00:00 local.
        let w = window(&[Weekday::Mon], "00:00", "24:00", "Asia/Tokyo");
        assert_eq!(
            opens(&w, "2026-12-06T14:59:59Z"),
            Some(ts("2026-12-06T15:00:00Z"))
        );
        assert_eq!(opens(&w, "2026-12-06T15:00:00Z"), None);
        assert_eq!(opens(&w, "2026-12-07T14:59:59Z"), None);
        assert_eq!(
            opens(&w, "2026-12-07T15:00:00Z"),
            Some(ts("2026-12-13T15:00:00Z"))
        );
    }

    #[test]
    fn of_several_windows_the_first_to_open_counts() {
        let mut both = office();
        both.windows
            .extend(window(&[Weekday::Sat], "10:00", "11:00", "UTC").windows);
        assert_eq!(
            opens(&both, "2026-12-04T20:00:00Z"),
            Some(ts("2026-12-05T10:00:00Z"))
        );
        assert_eq!(opens(&both, "2026-12-05T10:30:00Z"), None);
        assert_eq!(
            PromotionWindows::default().at(ts("2026-12-05T10:30:00Z")),
            WindowState::Open
        );
    }

    #[test]
    fn every_minute_of_a_year_agrees_with_a_plain_reading_of_the_local_clock() {
        let w = office();
        let zone = TimeZone::get("Europe/Berlin").unwrap();
        let mut now = ts("2027-01-01T00:00:00Z");
        let end = ts("2028-01-01T00:00:00Z");
        while now < end {
            let local = now.to_zoned(zone.clone());
            let weekday = local.weekday().to_monday_one_offset();
            let minutes = i32::from(local.hour()) * 60 + i32::from(local.minute());
            let open = weekday <= 5 && (9 * 60..16 * 60).contains(&minutes);
            match w.at(now) {
                WindowState::Open => assert!(open, "{local}"),
                WindowState::OpensAt(at) => {
                    assert!(!open, "{local}");
                    assert!(at.timestamp() > now);
                    assert!(matches!(w.at(at.timestamp()), WindowState::Open), "{at}");
                    let before = at.timestamp() - 1.minute();
                    assert!(
                        before < now || !matches!(w.at(before), WindowState::Open),
                        "{at}"
                    );
                }
            }
            now += 17.minutes();
        }
    }

    #[test]
    fn the_next_opening_reads_in_local_time() {
        let WindowState::OpensAt(at) = office().at(ts("2026-12-05T12:00:00Z")) else {
            panic!("closed on Saturdays")
        };
        assert_eq!(
            WindowState::OpensAt(at).to_string(),
            "Mon 2026-12-07 09:00 CET (Europe/Berlin)"
        );
    }

    #[test]
    fn bad_windows_name_their_field() {
        let bad = |start: &str, end: &str, zone: &str| {
            PromotionWindows::read(
                &[PromotionWindow {
                    days: vec![Weekday::Mon],
                    start: start.into(),
                    end: end.into(),
                    time_zone: zone.into(),
                }],
                "spec.promotionWindows",
            )
            .unwrap_err()
            .to_string()
        };
        assert_eq!(
            bad("09:00", "16:00", "Europe/Berln"),
            "spec.promotionWindows[0].timeZone: \"Europe/Berln\" is not a time zone of the IANA database; use a name such as Europe/Berlin or UTC"
        );
        assert!(
            bad("16:00", "09:00", "UTC")
                .starts_with("spec.promotionWindows[0].end: 09:00 is not after start 16:00")
        );
        assert!(bad("9am", "16:00", "UTC").starts_with("spec.promotionWindows[0].start:"));
        assert!(bad("09:00", "25:00", "UTC").starts_with("spec.promotionWindows[0].end:"));
    }
}
