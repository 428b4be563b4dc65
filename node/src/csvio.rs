//! Stock files: Shopify's inventory CSV and the plain `sku,location,on_hand`
//! format, read for imports (as counts) and written for exports.

use std::collections::HashMap;

use storemesh_protocol::ids::validate_name;
use storemesh_protocol::ops::{ImportRow, IMPORT_ROWS_MAX};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Shopify,
    Storemesh,
}

impl Format {
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "shopify" => Some(Format::Shopify),
            "storemesh" | "plain" => Some(Format::Storemesh),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Shopify => "shopify",
            Format::Storemesh => "storemesh",
        }
    }
}

/// Shopify location names ("Store 1") become storemesh location names ("store-1").
pub fn location_name(text: &str) -> String {
    let mut out: String = text
        .trim()
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    while out.contains("--") {
        out = out.replace("--", "-");
    }
    out.trim_matches('-').to_string()
}

/// Parses a stock file. Every bad row is reported with its line number; the
/// caller applies nothing unless the whole file is good.
pub fn parse(data: &[u8], format: Format) -> Result<Vec<ImportRow>, Vec<String>> {
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(data);
    let headers = match reader.headers() {
        Ok(h) => h.clone(),
        Err(e) => {
            return Err(vec![format!(
                "line 1: cannot read the header: {}",
                clip(&e.to_string())
            )])
        }
    };
    let col: HashMap<String, usize> = headers
        .iter()
        .enumerate()
        .map(|(i, h)| (h.to_lowercase(), i))
        .collect();
    let need = |name: &str| col.get(name).copied();
    let (sku_i, loc_i, qty_i, title_i) = match format {
        Format::Shopify => (
            need("sku"),
            need("location"),
            need("on hand"),
            need("title"),
        ),
        Format::Storemesh => (
            need("sku"),
            need("location"),
            need("on_hand"),
            need("title"),
        ),
    };
    let (Some(sku_i), Some(loc_i), Some(qty_i)) = (sku_i, loc_i, qty_i) else {
        let want = if format == Format::Shopify {
            "SKU, Location and On hand"
        } else {
            "sku, location and on_hand"
        };
        return Err(vec![format!(
            "line 1: the header must name the columns {want} (found: {})",
            clip(&headers.iter().collect::<Vec<_>>().join(", "))
        )]);
    };
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    for (i, rec) in reader.records().enumerate() {
        let line = i as u64 + 2;
        if rows.len() >= IMPORT_ROWS_MAX {
            errors.push(format!("line {line}: more than {IMPORT_ROWS_MAX} rows"));
            break;
        }
        let rec = match rec {
            Ok(r) => r,
            Err(e) => {
                errors.push(format!("line {line}: {}", clip(&e.to_string())));
                continue;
            }
        };
        if rec.iter().all(|f| f.is_empty()) {
            continue;
        }
        let sku = rec.get(sku_i).unwrap_or("").to_string();
        let location = location_name(rec.get(loc_i).unwrap_or(""));
        let qty_text = rec.get(qty_i).unwrap_or("");
        if sku.is_empty() {
            errors.push(format!("line {line}: SKU is empty"));
            continue;
        }
        if let Err(e) = validate_name("location", &location) {
            errors.push(format!("line {line}: {}", clip(&e)));
            continue;
        }
        let on_hand = match qty_text.parse::<i64>() {
            Ok(q) if (0..=1_000_000_000).contains(&q) => q as u64,
            Ok(q) => {
                errors.push(format!(
                    "line {line}: on hand {q} is out of range 0..=1000000000"
                ));
                continue;
            }
            Err(_) => {
                errors.push(format!(
                    "line {line}: on hand {:?} is not a whole number",
                    clip(qty_text)
                ));
                continue;
            }
        };
        let title = title_i
            .and_then(|t| rec.get(t))
            .filter(|t| !t.is_empty())
            .map(|t| t.chars().take(256).collect());
        rows.push(ImportRow {
            line,
            sku,
            title,
            location,
            on_hand,
        });
    }
    if rows.is_empty() && errors.is_empty() {
        errors.push("the file holds no rows".into());
    }
    if errors.is_empty() {
        Ok(rows)
    } else {
        Err(errors)
    }
}

/// One exported row: SKU, title, location, on hand, incoming.
pub struct ExportRow {
    pub sku: String,
    pub title: String,
    pub location: String,
    pub on_hand: i64,
    pub incoming: i64,
}

pub fn write(rows: &[ExportRow], format: Format) -> Result<Vec<u8>, String> {
    let mut w = csv::Writer::from_writer(Vec::new());
    let res = match format {
        Format::Shopify => {
            let mut r = w.write_record([
                "Handle",
                "Title",
                "SKU",
                "Location",
                "Incoming",
                "Unavailable",
                "Committed",
                "Available",
                "On hand",
            ]);
            for x in rows {
                if r.is_err() {
                    break;
                }
                let handle = location_name(&x.sku);
                let (inc, oh) = (x.incoming.to_string(), x.on_hand.to_string());
                r = w.write_record([
                    handle.as_str(),
                    &x.title,
                    &x.sku,
                    &x.location,
                    &inc,
                    "0",
                    "0",
                    &oh,
                    &oh,
                ]);
            }
            r
        }
        Format::Storemesh => {
            let mut r = w.write_record(["sku", "location", "on_hand"]);
            for x in rows {
                if r.is_err() {
                    break;
                }
                r = w.write_record([x.sku.as_str(), &x.location, &x.on_hand.to_string()]);
            }
            r
        }
    };
    res.map_err(|e| e.to_string())?;
    w.into_inner().map_err(|e| e.to_string())
}

/// The running node's HTTP base URL and a token with `scope` from its config.
fn node_endpoint(
    dir: &std::path::Path,
    scope: crate::config::Scope,
) -> anyhow::Result<(String, String)> {
    let cfg = crate::config::Config::load(dir)?;
    let mut addr = cfg.http_socket()?;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let token = cfg
        .api
        .tokens
        .iter()
        .find(|t| crate::config::Scope::allows(&t.scopes, scope))
        .map(|t| t.token.clone())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no API token with the '{}' scope in {}",
                scope.as_str(),
                dir.display()
            )
        })?;
    Ok((format!("http://{addr}"), token))
}

fn not_running(e: reqwest::Error, dir: &std::path::Path) -> anyhow::Error {
    anyhow::anyhow!(
        "cannot reach the node of {} ({e}); start it first with `storemesh run --data-dir {}`",
        dir.display(),
        dir.display()
    )
}

/// `storemesh import counts FILE`: checks the file locally (every bad row with
/// its line number), then sends it to the running node, which applies it as
/// counts in one operation — all or nothing.
/// `storemesh import counts --scope`: whether products the file does not
/// list are set to 0 at the file's locations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ImportScope {
    Partial,
    Full,
}

pub async fn import_file(
    dir: &std::path::Path,
    file: &std::path::Path,
    format: Format,
    scope: ImportScope,
) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    let data = std::fs::read(file).map_err(|e| {
        anyhow::anyhow!(
            "cannot read {}: {}",
            file.display(),
            crate::config::io_message(&e)
        )
    })?;
    let rows = parse(&data, format).map_err(|errors| {
        anyhow::anyhow!(
            "{}",
            storemesh_protocol::ops::import_errors(errors)
                .err()
                .unwrap_or_default()
        )
    })?;
    let (base, token) = node_endpoint(dir, crate::config::Scope::Stock)?;
    let tty = std::io::stderr().is_terminal();
    let started = std::time::Instant::now();
    let progress = tty.then(|| {
        let n = rows.len();
        tokio::spawn(async move {
            let frames = [
                "[=    ]", "[ =   ]", "[  =  ]", "[   = ]", "[    =]", "[   = ]", "[  =  ]",
                "[ =   ]",
            ];
            for i in 0.. {
                eprint!(
                    "\r{} importing {n} rows: {:.1} s",
                    frames[i % frames.len()],
                    started.elapsed().as_secs_f64()
                );
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        })
    });
    let resp = reqwest::Client::new()
        .post(format!(
            "{base}/api/imports/counts?format={}&scope={}",
            format.as_str(),
            match scope {
                ImportScope::Partial => "partial",
                ImportScope::Full => "full",
            }
        ))
        .bearer_auth(token)
        .header("content-type", "text/csv")
        .body(data)
        .send()
        .await;
    if let Some(p) = progress {
        p.abort();
        eprintln!();
    }
    let resp = resp.map_err(|e| not_running(e, dir))?;
    let status = resp.status();
    let body: serde_json::Value = resp.json().await.unwrap_or_default();
    if !status.is_success() {
        anyhow::bail!(
            "the node refused the import ({status}): {}",
            body["message"].as_str().unwrap_or("")
        );
    }
    let again = if status.as_u16() == 200 {
        " (this file was imported before; nothing changed)"
    } else {
        ""
    };
    println!(
        "imported {} rows in {:.1} s{again}",
        rows.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `storemesh node retire`: asks the running node of `dir` to retire `name`.
pub async fn retire(dir: &std::path::Path, name: &str, successor: &str) -> anyhow::Result<()> {
    let (base, token) = node_endpoint(dir, crate::config::Scope::Admin)?;
    let resp = reqwest::Client::new()
        .post(format!("{base}/api/nodes/{name}/retire"))
        .bearer_auth(token)
        .json(&serde_json::json!({ "successor": successor }))
        .send()
        .await
        .map_err(|e| not_running(e, dir))?;
    let status = resp.status();
    let body: serde_json::Value = resp.json().await.unwrap_or_default();
    if !status.is_success() {
        anyhow::bail!(
            "the node refused the retirement ({status}): {}",
            body["message"].as_str().unwrap_or("")
        );
    }
    println!("retired {name}; its rights pass to {successor} and its key is refused as the mesh learns of it");
    Ok(())
}

/// `storemesh export inventory`: the running node's stock as CSV.
pub async fn export(dir: &std::path::Path, format: Format) -> anyhow::Result<Vec<u8>> {
    let (base, token) = node_endpoint(dir, crate::config::Scope::Read)?;
    let resp = reqwest::Client::new()
        .get(format!(
            "{base}/api/exports/inventory?format={}",
            format.as_str()
        ))
        .bearer_auth(token)
        .send()
        .await
        .map_err(|e| not_running(e, dir))?;
    let status = resp.status();
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| anyhow::anyhow!("export interrupted: {e}"))?;
    if !status.is_success() {
        anyhow::bail!(
            "the node refused the export ({status}): {}",
            String::from_utf8_lossy(&bytes)
        );
    }
    Ok(bytes.to_vec())
}

/// Input echoed in an error message at most: a 10 MB header line must not
/// come back as a 10 MB answer.
pub const ECHO_BYTES_MAX: usize = 200;

/// `s` cut to at most `ECHO_BYTES_MAX` bytes (at a character boundary),
/// with an ellipsis when cut.
pub fn clip(s: &str) -> String {
    if s.len() <= ECHO_BYTES_MAX {
        return s.to_string();
    }
    let mut end = ECHO_BYTES_MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &s[..end], s.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shopify_rows_and_errors() {
        let data = b"Handle,Title,SKU,Location,Incoming,Unavailable,Committed,Available,On hand\n\
mug,Mug,MUG-01,Store 1,0,0,0,5,5\n\
tee,Tee,TEE-01,Web Warehouse,2,0,0,3,3\n";
        let rows = parse(data, Format::Shopify).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].location, "store-1");
        assert_eq!(rows[1].location, "web-warehouse");
        assert_eq!(rows[1].on_hand, 3);
        assert_eq!(rows[1].line, 3);
        let bad = b"Handle,Title,SKU,Location,On hand\nmug,Mug,MUG-01,Store 1,5\ntee,Tee,TEE-01,Store 1,-3\nx,X,,Store 1,1\n";
        let e = parse(bad, Format::Shopify).unwrap_err();
        assert!(e[0].starts_with("line 3:"), "{e:?}");
        assert!(e[1].starts_with("line 4:"), "{e:?}");
        assert!(parse(b"a,b\n1,2\n", Format::Shopify).is_err());
    }

    #[test]
    fn plain_round_trip() {
        let rows = vec![ExportRow {
            sku: "A-1".into(),
            title: "A".into(),
            location: "store-1".into(),
            on_hand: 4,
            incoming: 0,
        }];
        let out = write(&rows, Format::Storemesh).unwrap();
        let back = parse(&out, Format::Storemesh).unwrap();
        assert_eq!(
            (
                back[0].sku.as_str(),
                back[0].location.as_str(),
                back[0].on_hand
            ),
            ("A-1", "store-1", 4)
        );
        let out = write(&rows, Format::Shopify).unwrap();
        let back = parse(&out, Format::Shopify).unwrap();
        assert_eq!(back[0].on_hand, 4);
    }
}
