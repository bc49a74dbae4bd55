//! The pprof format: `perftools.profiles.Profile` (github.com/google/pprof,
//! `proto/profile.proto`) as prost messages, only the fields a heap profile fills, with their
//! field numbers from that file; encoded and gzip-compressed as `pprof` reads it.

use std::collections::HashMap;
use std::io::Write as _;

use super::HeapProfile;

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Profile {
    #[prost(message, repeated, tag = "1")]
    pub(crate) sample_type: Vec<ValueType>,
    #[prost(message, repeated, tag = "2")]
    pub(crate) sample: Vec<Sample>,
    #[prost(message, repeated, tag = "4")]
    pub(crate) location: Vec<Location>,
    #[prost(message, repeated, tag = "5")]
    pub(crate) function: Vec<Function>,
    #[prost(string, repeated, tag = "6")]
    pub(crate) string_table: Vec<String>,
    #[prost(int64, tag = "9")]
    pub(crate) time_nanos: i64,
    #[prost(message, optional, tag = "11")]
    pub(crate) period_type: Option<ValueType>,
    #[prost(int64, tag = "12")]
    pub(crate) period: i64,
    #[prost(int64, tag = "14")]
    pub(crate) default_sample_type: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct ValueType {
    #[prost(int64, tag = "1")]
    pub(crate) r#type: i64,
    #[prost(int64, tag = "2")]
    pub(crate) unit: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Sample {
    #[prost(uint64, repeated, tag = "1")]
    pub(crate) location_id: Vec<u64>,
    #[prost(int64, repeated, tag = "2")]
    pub(crate) value: Vec<i64>,
    #[prost(message, repeated, tag = "3")]
    pub(crate) label: Vec<Label>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Label {
    #[prost(int64, tag = "1")]
    pub(crate) key: i64,
    #[prost(int64, tag = "2")]
    pub(crate) str: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Location {
    #[prost(uint64, tag = "1")]
    pub(crate) id: u64,
    #[prost(uint64, tag = "3")]
    pub(crate) address: u64,
    #[prost(message, repeated, tag = "4")]
    pub(crate) line: Vec<Line>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Line {
    #[prost(uint64, tag = "1")]
    pub(crate) function_id: u64,
    #[prost(int64, tag = "2")]
    pub(crate) line: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Function {
    #[prost(uint64, tag = "1")]
    pub(crate) id: u64,
    #[prost(int64, tag = "2")]
    pub(crate) name: i64,
    #[prost(int64, tag = "3")]
    pub(crate) system_name: i64,
    #[prost(int64, tag = "4")]
    pub(crate) filename: i64,
}

/// The string table, index 0 the empty string as the format requires.
struct Strings {
    table: Vec<String>,
    index: HashMap<String, i64>,
}

impl Strings {
    fn new() -> Strings {
        Strings {
            table: vec![String::new()],
            index: HashMap::from([(String::new(), 0)]),
        }
    }

    fn id(&mut self, s: &str) -> i64 {
        if let Some(&i) = self.index.get(s) {
            return i;
        }
        let i = self.table.len() as i64;
        self.table.push(s.to_string());
        self.index.insert(s.to_string(), i);
        i
    }
}

/// The profile as a `Profile` message (not yet encoded).
pub(crate) fn message(p: &HeapProfile) -> Profile {
    let mut strings = Strings::new();
    let value_type = |strings: &mut Strings, t: &str, u: &str| ValueType {
        r#type: strings.id(t),
        unit: strings.id(u),
    };
    let sample_type = vec![
        value_type(&mut strings, "inuse_objects", "count"),
        value_type(&mut strings, "inuse_space", "bytes"),
    ];
    let period_type = Some(value_type(&mut strings, "space", "bytes"));
    let engine_key = strings.id("engine");
    let scope_key = strings.id("scope");
    let mut functions: HashMap<(String, Option<String>), u64> = HashMap::new();
    let mut function_list = Vec::new();
    let mut locations: HashMap<(usize, String), u64> = HashMap::new();
    let mut location_list = Vec::new();
    let mut samples = Vec::new();
    for site in &p.sites {
        let mut ids = Vec::new();
        // Frames sharing an address are one location with inlined lines (innermost first).
        let mut i = 0;
        while i < site.frames.len() {
            let address = site.frames[i].address;
            let run = site.frames[i..]
                .iter()
                .take_while(|f| f.address == address)
                .count();
            let group = &site.frames[i..i + run];
            let key = (address, group[0].function.clone());
            let next_id = location_list.len() as u64 + 1;
            let id = *locations.entry(key).or_insert_with(|| {
                let line = group
                    .iter()
                    .map(|f| {
                        let fkey = (f.function.clone(), f.file.clone());
                        let next = function_list.len() as u64 + 1;
                        let function_id = *functions.entry(fkey).or_insert_with(|| {
                            let name = strings.id(&f.function);
                            function_list.push(Function {
                                id: next,
                                name,
                                system_name: name,
                                filename: strings.id(f.file.as_deref().unwrap_or("")),
                            });
                            next
                        });
                        Line {
                            function_id,
                            line: f.line.map_or(0, i64::from),
                        }
                    })
                    .collect();
                location_list.push(Location {
                    id: next_id,
                    address: address as u64,
                    line,
                });
                next_id
            });
            ids.push(id);
            i += run;
        }
        samples.push(Sample {
            location_id: ids,
            value: vec![site.blocks.round() as i64, site.bytes.round() as i64],
            label: std::iter::once(Label {
                key: engine_key,
                str: strings.id(site.engine.name()),
            })
            .chain(site.scope.map(|scope| Label {
                key: scope_key,
                str: strings.id(&site.scope_path.clone().unwrap_or_else(|| scope.to_string())),
            }))
            .collect(),
        });
    }
    let time_nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
    Profile {
        sample_type,
        sample: samples,
        location: location_list,
        function: function_list,
        string_table: strings.table,
        time_nanos,
        period_type,
        period: i64::try_from(p.interval).unwrap_or(i64::MAX),
        default_sample_type: 1,
    }
}

/// The profile encoded and gzip-compressed.
pub(crate) fn encode(p: &HeapProfile) -> Vec<u8> {
    let bytes = prost::Message::encode_to_vec(&message(p));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    // Writing into a `Vec` cannot fail.
    let _ = gz.write_all(&bytes);
    gz.finish().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;
    use crate::EngineId;
    use crate::profile::{Frame, Site};

    fn frame(function: &str, address: usize, line: u32) -> Frame {
        Frame {
            function: function.to_string(),
            file: Some("src/engine.rs".to_string()),
            line: Some(line),
            address,
        }
    }

    #[test]
    fn a_profile_reads_back_with_its_sites_values_and_labels() {
        let p = HeapProfile {
            engine: None,
            interval: 4 << 20,
            sites: vec![
                Site {
                    engine: EngineId::Query,
                    // An inlined frame shares its caller's address: one location, two lines.
                    frames: vec![
                        frame("query::hash_insert", 0x1000, 10),
                        frame("query::aggregate", 0x1000, 20),
                        frame("main", 0x2000, 30),
                    ],
                    bytes: 3_000_000.4,
                    sampled_bytes: 2_900_000.0,
                    blocks: 1000.6,
                    samples: 12,
                    scope: Some(crate::ScopeId(3)),
                    scope_path: Some("sales/acme".to_string()),
                },
                Site {
                    engine: EngineId::Vector,
                    frames: vec![frame("vector::build", 0x3000, 5), frame("main", 0x2000, 30)],
                    bytes: 1_000_000.0,
                    sampled_bytes: 1_000_000.0,
                    blocks: 10.0,
                    samples: 3,
                    scope: None,
                    scope_path: None,
                },
            ],
            exact_bytes: 4_000_000,
        };
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(&encode(&p)[..])
            .read_to_end(&mut raw)
            .unwrap();
        let back = <Profile as prost::Message>::decode(&raw[..]).unwrap();
        let s = |i: i64| back.string_table[i as usize].as_str();
        assert_eq!(back.string_table[0], "");
        let types: Vec<(&str, &str)> = back
            .sample_type
            .iter()
            .map(|t| (s(t.r#type), s(t.unit)))
            .collect();
        assert_eq!(
            types,
            [("inuse_objects", "count"), ("inuse_space", "bytes")]
        );
        assert_eq!(back.period, 4 << 20);
        assert_eq!(back.sample.len(), 2);
        assert_eq!(back.sample[0].value, [1001, 3_000_000]);
        assert_eq!(back.sample[1].value, [10, 1_000_000]);
        let total: i64 = back.sample.iter().map(|x| x.value[1]).sum();
        assert_eq!(total, 4_000_000);
        let labels: Vec<Vec<(&str, &str)>> = back
            .sample
            .iter()
            .map(|x| x.label.iter().map(|l| (s(l.key), s(l.str))).collect())
            .collect();
        assert_eq!(
            labels,
            [
                vec![("engine", "query"), ("scope", "sales/acme")],
                vec![("engine", "vector")]
            ]
        );
        // Three addresses, three locations; `main` is shared by both stacks.
        assert_eq!(back.location.len(), 3);
        assert_eq!(back.sample[0].location_id.len(), 2);
        assert_eq!(back.sample[0].location_id[1], back.sample[1].location_id[1]);
        let first = &back.location[(back.sample[0].location_id[0] - 1) as usize];
        assert_eq!(first.address, 0x1000);
        let name = |id: u64| s(back.function[(id - 1) as usize].name);
        let lines: Vec<(&str, i64)> = first
            .line
            .iter()
            .map(|l| (name(l.function_id), l.line))
            .collect();
        assert_eq!(
            lines,
            [("query::hash_insert", 10), ("query::aggregate", 20)]
        );
        assert_eq!(back.function.len(), 4);
    }

    #[test]
    fn folded_stacks_run_outermost_first_with_the_engine_on_top() {
        let p = HeapProfile {
            engine: Some(EngineId::Query),
            interval: 1 << 20,
            sites: vec![Site {
                engine: EngineId::Query,
                frames: vec![frame("inner fn;x", 1, 1), frame("outer", 2, 2)],
                bytes: 10.6,
                sampled_bytes: 9.0,
                blocks: 1.0,
                samples: 1,
                scope: Some(crate::ScopeId(4)),
                scope_path: None,
            }],
            exact_bytes: 11,
        };
        // A tagged site's scope under the engine (its number: the scope was gone).
        assert_eq!(p.to_folded(), "query;scope:#4;outer;inner_fn_x 11\n");
        assert_eq!(p.estimated_bytes(), 9.0);
        assert!((p.error().unwrap() + 2.0 / 11.0).abs() < 1e-12);
        assert_eq!(p.top(5).len(), 1);
    }
}
