//! A small W3C WebDriver client for the desktop app's UI tests, spoken to `tauri-driver`
//! (which hands the session to WebKitWebDriver and the real app window).
//!
//! Hand-written on purpose: the tests need a dozen plain-HTTP endpoints on loopback, and the
//! maintained Rust clients (fantoccini, thirtyfour) bring hyper-rustls with their own choice
//! of TLS provider plus a second HTTP stack; reqwest is already in the workspace.

use std::{path::Path, time::Duration};

use base64::Engine;
use serde_json::{Value, json};

/// The W3C element reference key.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("WebDriver HTTP request failed: {0}")]
    Http(#[from] reqwest::Error),
    #[error("WebDriver error {error}: {message}")]
    Driver { error: String, message: String },
    #[error("unexpected WebDriver answer: {0}")]
    Protocol(String),
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
    #[error("file error: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// The element was replaced in the page (the app re-rendered) between finding and using
    /// it; finding it again is the cure (W3C WebDriver error code "stale element reference").
    pub fn is_stale(&self) -> bool {
        matches!(self, Error::Driver { error, .. } if error == "stale element reference")
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// One WebDriver session: the app window.
pub struct Session {
    http: reqwest::Client,
    base: String,
}

/// An element found in the page.
#[derive(Debug, Clone)]
pub struct Element(String);

impl Session {
    /// Starts the app at `application` (absolute path) with `args` under the driver at
    /// `driver_url` (e.g. `http://127.0.0.1:4444`).
    pub async fn start(driver_url: &str, application: &Path, args: &[String]) -> Result<Session> {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(120)).build()?;
        let capabilities = json!({
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "wry",
                    "tauri:options": { "application": application.display().to_string(), "args": args },
                }
            }
        });
        let answer =
            command(&http, reqwest::Method::POST, &format!("{driver_url}/session"), Some(capabilities)).await?;
        let id = answer["sessionId"].as_str().ok_or_else(|| Error::Protocol(format!("no sessionId in {answer}")))?;
        Ok(Session { http, base: format!("{driver_url}/session/{id}") })
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Result<Value> {
        command(&self.http, method, &format!("{}{path}", self.base), body).await
    }

    /// Ends the session (the driver closes the app).
    pub async fn quit(self) -> Result<()> {
        command(&self.http, reqwest::Method::DELETE, &self.base, None).await.map(drop)
    }

    /// The first element matching a CSS selector, if any.
    pub async fn find(&self, css: &str) -> Result<Option<Element>> {
        Ok(self.find_all(css).await?.into_iter().next())
    }

    pub async fn find_all(&self, css: &str) -> Result<Vec<Element>> {
        let answer =
            self.call(reqwest::Method::POST, "/elements", Some(json!({"using": "css selector", "value": css}))).await?;
        let list = answer.as_array().ok_or_else(|| Error::Protocol(format!("elements: {answer}")))?;
        list.iter()
            .map(|e| {
                e[ELEMENT_KEY]
                    .as_str()
                    .map(|id| Element(id.to_owned()))
                    .ok_or_else(|| Error::Protocol(format!("element: {e}")))
            })
            .collect()
    }

    /// Waits until a displayed element matches `css`.
    pub async fn wait_for(&self, css: &str, timeout: Duration) -> Result<Element> {
        let what = format!("a visible `{css}`");
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // WebKitWebDriver can also answer the search itself with "stale element reference"
            // when a match is replaced while it builds the handle: that is a re-render too.
            let found = match self.find_all(css).await {
                Ok(found) => found,
                Err(e) if e.is_stale() => Vec::new(),
                Err(e) => return Err(e),
            };
            for element in found {
                match self.displayed(&element).await {
                    Ok(true) => return Ok(element),
                    Ok(false) => {}
                    // Replaced by a re-render since it was found: look again.
                    Err(e) if e.is_stale() => {}
                    Err(e) => return Err(e),
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Timeout(timeout, what));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until `probe` (a script returning a value) returns something truthy; returns it.
    pub async fn wait_until(&self, what: &str, script: &str, args: Vec<Value>, timeout: Duration) -> Result<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let value = self.execute(script, args.clone()).await?;
            let truthy = !matches!(&value, Value::Null | Value::Bool(false))
                && value != json!("")
                && value != json!(0)
                && value != json!([]);
            if truthy {
                return Ok(value);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Timeout(timeout, what.to_owned()));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    pub async fn displayed(&self, element: &Element) -> Result<bool> {
        let answer = self.call(reqwest::Method::GET, &format!("/element/{}/displayed", element.0), None).await?;
        Ok(answer.as_bool().unwrap_or(false))
    }

    pub async fn click(&self, element: &Element) -> Result<()> {
        self.call(reqwest::Method::POST, &format!("/element/{}/click", element.0), Some(json!({}))).await.map(drop)
    }

    pub async fn clear(&self, element: &Element) -> Result<()> {
        self.call(reqwest::Method::POST, &format!("/element/{}/clear", element.0), Some(json!({}))).await.map(drop)
    }

    /// Types into an element (replacing nothing; see [`Session::clear`]).
    pub async fn type_text(&self, element: &Element, text: &str) -> Result<()> {
        self.call(reqwest::Method::POST, &format!("/element/{}/value", element.0), Some(json!({"text": text})))
            .await
            .map(drop)
    }

    /// Clears a field and types `text` into it.
    pub async fn fill(&self, css: &str, text: &str) -> Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let element = self.wait_for(css, Duration::from_secs(10)).await?;
            let result = match self.clear(&element).await {
                Ok(()) => self.type_text(&element, text).await,
                Err(e) => Err(e),
            };
            match result {
                Err(e) if e.is_stale() && tokio::time::Instant::now() < deadline => continue,
                other => return other,
            }
        }
    }

    /// Clicks the first visible match of `css`.
    pub async fn click_on(&self, css: &str) -> Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let element = self.wait_for(css, Duration::from_secs(10)).await?;
            match self.click(&element).await {
                Err(e) if e.is_stale() && tokio::time::Instant::now() < deadline => continue,
                other => return other,
            }
        }
    }

    /// The rendered text of an element.
    pub async fn text(&self, element: &Element) -> Result<String> {
        let answer = self.call(reqwest::Method::GET, &format!("/element/{}/text", element.0), None).await?;
        Ok(answer.as_str().unwrap_or_default().to_owned())
    }

    /// Runs a synchronous script in the page; `arguments[i]` are `args`.
    pub async fn execute(&self, script: &str, args: Vec<Value>) -> Result<Value> {
        self.call(reqwest::Method::POST, "/execute/sync", Some(json!({"script": script, "args": args}))).await
    }

    /// Saves a PNG screenshot of the window.
    pub async fn screenshot(&self, path: &Path) -> Result<()> {
        let answer = self.call(reqwest::Method::GET, "/screenshot", None).await?;
        let data = answer.as_str().ok_or_else(|| Error::Protocol("screenshot without data".into()))?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(data)
            .map_err(|e| Error::Protocol(format!("screenshot base64: {e}")))?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, png)?;
        Ok(())
    }
}

/// One WebDriver command: the answer's `value`, or its error.
async fn command(http: &reqwest::Client, method: reqwest::Method, url: &str, body: Option<Value>) -> Result<Value> {
    let mut request = http.request(method, url);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await?;
    let status = response.status();
    let answer: Value = response.json().await?;
    let value = answer.get("value").cloned().unwrap_or(Value::Null);
    if !status.is_success() {
        return Err(Error::Driver {
            error: value["error"].as_str().unwrap_or("unknown error").to_owned(),
            message: value["message"].as_str().unwrap_or_default().to_owned(),
        });
    }
    Ok(value)
}
