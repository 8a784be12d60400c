//! The command line: `serve` (default), `config ...`, `migrate`, `user ...`,
//! `registration-token ...`, `media ...`.

use std::{io::BufRead, path::PathBuf, process::ExitCode};

use clap::{Args, Parser, Subcommand};

use crate::{
    config::{LogFormat, Settings, docs},
    server,
    store::now_ms,
};

#[derive(Debug, Parser)]
#[command(name = "homeserver", version, about = "The Obmin Matrix homeserver")]
pub struct Cli {
    /// TOML configuration file; every option can also be set with an OBMIN_* variable.
    #[arg(long, short, global = true, env = "OBMIN_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the homeserver (the default).
    Serve,
    /// Print the configuration's example file or reference page.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print a complete, commented configuration file (the same as `config example`).
    GenerateConfig,
    /// Apply database migrations and exit.
    Migrate,
    /// Manage accounts.
    #[command(subcommand)]
    User(UserCommand),
    /// Manage registration tokens (for `registration = "token"`).
    #[command(subcommand)]
    RegistrationToken(TokenCommand),
    /// Manage the media repository.
    #[command(subcommand)]
    Media(MediaCommand),
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// A complete, commented configuration file: every option with its default
    /// (`config/homeserver.toml`).
    Example,
    /// Every option with its environment variable, default and description, as Markdown
    /// (`docs/configuration.md`).
    Reference,
}

#[derive(Debug, Subcommand)]
pub enum MediaCommand {
    /// List local media (media_id, owner, size, type, uploaded), optionally of one user.
    List {
        /// Only this user's media (`alice` or `@alice:server`).
        #[arg(long)]
        user: Option<String>,
    },
    /// Delete media by id (`abc` or `mxc://server/abc`), with its thumbnails and, once
    /// nothing else refers to it, its file.
    Delete { media: Vec<String> },
    /// Bytes and number of files stored per user.
    Usage,
    /// Delete cached remote media (other servers' files fetched for local users); they are
    /// fetched again when next downloaded.
    PurgeRemote {
        /// Only media fetched longer ago than this, e.g. `30d`.
        #[arg(long, value_parser = parse_duration_ms)]
        older_than: Option<i64>,
    },
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create an account. Without --password, the password is read from standard input.
    Create {
        /// The localpart, e.g. `alice` for @alice:server.
        localpart: String,
        #[command(flatten)]
        password: PasswordArg,
        /// Make the account a server administrator.
        #[arg(long)]
        admin: bool,
    },
    /// List every account.
    List,
    /// Set a new password and log out every device.
    ResetPassword {
        /// `alice` or `@alice:server`.
        user: String,
        #[command(flatten)]
        password: PasswordArg,
    },
    /// Deactivate an account for good (the user id is never reused).
    Deactivate {
        /// `alice` or `@alice:server`.
        user: String,
    },
}

#[derive(Debug, Args)]
pub struct PasswordArg {
    /// The password (visible in the process list; prefer standard input).
    #[arg(long)]
    password: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token and print it.
    Create {
        /// The token itself (default: 16 random characters).
        #[arg(long)]
        token: Option<String>,
        /// How many registrations it allows (default: unlimited).
        #[arg(long)]
        uses_allowed: Option<u32>,
        /// How long it stays valid, e.g. `30m`, `12h`, `7d` (default: forever).
        #[arg(long, value_parser = parse_duration_ms)]
        expires_in: Option<i64>,
    },
    /// List tokens with their use counts.
    List,
    /// Delete a token.
    Revoke { token: String },
}

fn parse_duration_ms(s: &str) -> Result<i64, String> {
    let (number, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 = number.parse().map_err(|_| format!("`{s}` is not a duration like 30m, 12h or 7d"))?;
    let factor = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" | "" => 86_400_000,
        _ => return Err(format!("unknown unit `{unit}`: use s, m, h or d")),
    };
    n.checked_mul(factor).filter(|v| *v > 0).ok_or_else(|| format!("`{s}` is out of range"))
}

/// Runs the command line and returns the process exit code.
pub async fn run(cli: Cli) -> ExitCode {
    // The configuration's documents need no configuration (and must not fail on a bad one).
    match cli.command {
        Some(Command::GenerateConfig | Command::Config(ConfigCommand::Example)) => {
            print!("{}", docs::example());
            return ExitCode::SUCCESS;
        }
        Some(Command::Config(ConfigCommand::Reference)) => {
            print!("{}", docs::reference());
            return ExitCode::SUCCESS;
        }
        _ => {}
    }
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let serving = matches!(cli.command, None | Some(Command::Serve));
    init_logging(&settings, serving);
    let result = match cli.command {
        None | Some(Command::Serve) => server::serve(settings).await.map_err(|e| e.to_string()),
        Some(Command::GenerateConfig | Command::Config(_)) => Ok(()),
        Some(Command::Migrate) => server::open_store(&settings)
            .await
            .map(|store| {
                println!("database is up to date");
                drop(store);
            })
            .map_err(|e| e.to_string()),
        Some(Command::User(cmd)) => user_command(settings, cmd).await,
        Some(Command::RegistrationToken(cmd)) => token_command(settings, cmd).await,
        Some(Command::Media(cmd)) => media_command(settings, cmd).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(settings: &Settings, serving: bool) {
    // Admin commands print their results; only warnings and errors are logged there.
    let filter = if serving { settings.log.filter.as_str() } else { "warn" };
    let mut filter = tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| "info".into());
    // ruma's state resolution logs every authorized event at INFO ("allowing event passed all
    // checks"): two lines per message at the default filter, noise and a cost on the send
    // path. It stays quiet below WARN unless the operator's filter names it.
    if !settings.log.filter.contains("ruma_state_res") {
        filter = filter.add_directive("ruma_state_res=warn".parse().expect("a valid directive"));
    }
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let result = match settings.log.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
    if let Err(e) = result {
        eprintln!("warning: cannot initialise logging: {e}");
    }
}

fn read_password(arg: PasswordArg) -> Result<String, String> {
    if let Some(p) = arg.password {
        return Ok(p);
    }
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).map_err(|e| format!("cannot read the password: {e}"))?;
    let password = line.trim_end_matches(['\n', '\r']).to_owned();
    if password.is_empty() {
        return Err("no password given (use --password or write it to standard input)".to_owned());
    }
    Ok(password)
}

async fn user_command(settings: Settings, cmd: UserCommand) -> Result<(), String> {
    let services = server::build_services(settings).await.map_err(|e| e.to_string())?;
    let result = match cmd {
        UserCommand::Create { localpart, password, admin } => {
            let password = read_password(password)?;
            let user_id =
                services.accounts.create_from_cli(&localpart, password, admin).await.map_err(|e| e.to_string())?;
            println!("{user_id}");
            Ok(())
        }
        UserCommand::List => {
            let users = services.accounts.list().await.map_err(|e| e.to_string())?;
            println!("{:<40} {:<6} {:<12} created (unix s)", "user_id", "admin", "deactivated");
            for u in users {
                println!("{:<40} {:<6} {:<12} {}", u.user_id, u.is_admin, u.deactivated, format_ts(u.created_ts));
            }
            Ok(())
        }
        UserCommand::ResetPassword { user, password } => {
            let user_id = services.accounts.resolve_local_user(&user).map_err(|e| e.to_string())?;
            let password = read_password(password)?;
            services.accounts.reset_password(&user_id, password).await.map_err(|e| e.to_string())?;
            println!("password changed for {user_id}; every device was logged out");
            Ok(())
        }
        UserCommand::Deactivate { user } => {
            let user_id = services.accounts.resolve_local_user(&user).map_err(|e| e.to_string())?;
            match services.accounts.exists(&user_id).await.map_err(|e| e.to_string())? {
                false => Err(format!("no such user: {user_id}")),
                true => {
                    if services.accounts.deactivate(&user_id).await.map_err(|e| e.to_string())? {
                        println!("deactivated {user_id}");
                    } else {
                        println!("{user_id} was already deactivated");
                    }
                    Ok(())
                }
            }
        }
    };
    services.store.close().await;
    result
}

async fn token_command(settings: Settings, cmd: TokenCommand) -> Result<(), String> {
    let services = server::build_services(settings).await.map_err(|e| e.to_string())?;
    let result = match cmd {
        TokenCommand::Create { token, uses_allowed, expires_in } => {
            let expiry = expires_in.map(|ms| now_ms().saturating_add(ms));
            let row = services
                .registration_tokens
                .create(token, uses_allowed.map(i64::from), expiry)
                .await
                .map_err(|e| e.to_string())?;
            println!("{}", row.token);
            Ok(())
        }
        TokenCommand::List => {
            let rows = services.registration_tokens.list().await.map_err(|e| e.to_string())?;
            println!("{:<24} {:>8} {:>8} {:<24} valid", "token", "allowed", "used", "expires (unix s)");
            let now = now_ms();
            for r in rows {
                let allowed = r.uses_allowed.map_or("-".to_owned(), |n| n.to_string());
                let expires = r.expiry_ts.map_or("never".to_owned(), format_ts);
                println!("{:<24} {:>8} {:>8} {:<24} {}", r.token, allowed, r.completed, expires, r.is_valid_at(now));
            }
            Ok(())
        }
        TokenCommand::Revoke { token } => {
            if services.registration_tokens.revoke(&token).await.map_err(|e| e.to_string())? {
                println!("revoked {token}");
                Ok(())
            } else {
                Err(format!("no such token: {token}"))
            }
        }
    };
    services.store.close().await;
    result
}

async fn media_command(settings: Settings, cmd: MediaCommand) -> Result<(), String> {
    let services = server::build_services(settings).await.map_err(|e| e.to_string())?;
    let result = match cmd {
        MediaCommand::List { user } => {
            let user_id = match user {
                Some(u) => Some(services.accounts.resolve_local_user(&u).map_err(|e| e.to_string())?),
                None => None,
            };
            let rows =
                services.store.list_media(user_id.as_ref().map(|u| u.as_str())).await.map_err(|e| e.to_string())?;
            println!("{:<26} {:<32} {:>12} {:<28} uploaded", "media_id", "user_id", "bytes", "content_type");
            for r in rows {
                let uploaded = r.uploaded_ts.map_or("pending".to_owned(), format_ts);
                let content_type = r.content_type.unwrap_or_else(|| "-".to_owned());
                println!("{:<26} {:<32} {:>12} {:<28} {}", r.media_id, r.user_id, r.size, content_type, uploaded);
            }
            Ok(())
        }
        MediaCommand::Delete { media } => {
            let mut missing = Vec::new();
            for m in media {
                let id = m.rsplit('/').next().unwrap_or(&m).to_owned();
                if services.media.delete(&id).await.map_err(|e| e.to_string())? {
                    println!("deleted {id}");
                } else {
                    missing.push(id);
                }
            }
            if missing.is_empty() { Ok(()) } else { Err(format!("no such media: {}", missing.join(", "))) }
        }
        MediaCommand::Usage => {
            let rows = services.store.media_usage().await.map_err(|e| e.to_string())?;
            println!("{:<40} {:>8} {:>14}", "user_id", "files", "bytes");
            for r in rows {
                println!("{:<40} {:>8} {:>14}", r.user_id, r.count, r.bytes);
            }
            Ok(())
        }
        MediaCommand::PurgeRemote { older_than } => {
            let before = crate::store::now_ms() - older_than.unwrap_or(0);
            let purged = services.media.purge_remote(before).await.map_err(|e| e.to_string())?;
            println!("purged {purged} remote media");
            Ok(())
        }
    };
    services.store.close().await;
    result
}

/// Timestamps are printed as Unix seconds (the column headers say so), which scripts can
/// parse and `date -d @N` turns into a date.
fn format_ts(ms: i64) -> String {
    (ms / 1000).to_string()
}
