//! `secret set|list|delete`: straight to the secrets bucket. Values are read from stdin or a
//! file, sealed by the client library before they leave the process, and never printed.

use std::io::Read;

use mycelium_client::{Client, SecretError, SecretErrorKind};
use mycelium_core::secret::SecretName;

use crate::{
    args::{SecretArgs, SecretCommand},
    output::{error_chain, Code, Failure},
    run::print_json,
};

pub async fn secret(client: &Client, args: SecretArgs) -> Result<(), Failure> {
    let store = client.secrets().await.map_err(|e| failure(&e))?;
    match args.command {
        SecretCommand::Set {
            name,
            from_file,
            public_xkey,
            json,
        } => {
            let name = secret_name(&name)?;
            let value = match &from_file {
                Some(path) => std::fs::read(path).map_err(|e| {
                    Failure::new(
                        Code::InvalidData,
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?,
                None => read_stdin()?,
            };
            let value = String::from_utf8(value).map_err(|_| {
                Failure::new(
                    Code::InvalidSecret,
                    "the secret value is not UTF-8 text, which environment variables need; encode binary material (base64) first",
                )
            })?;
            let info = store
                .set(&name, &value, public_xkey.as_deref())
                .await
                .map_err(|e| failure(&e))?;
            if json {
                print_json(&serde_json::to_value(&info).unwrap_or_default());
            } else {
                println!(
                    "secret {} set: v{} (sealed for {})",
                    info.name, info.version, info.recipient
                );
            }
        }
        SecretCommand::List { json } => {
            let secrets = store.list().await.map_err(|e| failure(&e))?;
            if json {
                print_json(&serde_json::to_value(&secrets).unwrap_or_default());
            } else if secrets.is_empty() {
                println!("no secrets; `mycelium secret set NAME` stores one");
            } else {
                println!("{:<32} {:>7}  UPDATED", "NAME", "VERSION");
                for secret in secrets {
                    println!(
                        "{:<32} {:>7}  {}",
                        secret.name,
                        format!("v{}", secret.version),
                        secret.updated_at.format("%Y-%m-%d %H:%M:%S UTC")
                    );
                }
            }
        }
        SecretCommand::Delete { name } => {
            let name = secret_name(&name)?;
            store.delete(&name).await.map_err(|e| failure(&e))?;
            println!("secret {name} deleted");
        }
    }
    Ok(())
}

fn secret_name(text: &str) -> Result<SecretName, Failure> {
    SecretName::new(text).map_err(|e| Failure::new(Code::InvalidSecret, e.to_string()))
}

/// The value from stdin, less one trailing newline (`echo value |` adds it). A terminal is
/// refused: typing a secret where it echoes is what reading stdin exists to avoid.
fn read_stdin() -> Result<Vec<u8>, Failure> {
    use std::io::IsTerminal;
    if std::io::stdin().is_terminal() {
        return Err(Failure::new(
            Code::Usage,
            "give the value on stdin (`mycelium secret set NAME < file`, or from a password manager's pipe) or with --from-file; it is never taken from the command line",
        ));
    }
    let mut value = Vec::new();
    std::io::stdin()
        .read_to_end(&mut value)
        .map_err(|e| Failure::new(Code::InvalidData, format!("reading stdin: {e}")))?;
    if value.ends_with(b"\n") {
        value.pop();
        if value.ends_with(b"\r") {
            value.pop();
        }
    }
    Ok(value)
}

fn failure(e: &SecretError) -> Failure {
    let code = match e.kind() {
        SecretErrorKind::InvalidValue | SecretErrorKind::InvalidKey => Code::InvalidSecret,
        SecretErrorKind::NoRecipient => Code::NoXkey,
        SecretErrorKind::NotFound => Code::SecretNotFound,
        SecretErrorKind::Unopenable => Code::Internal,
        SecretErrorKind::Storage => Code::Registry,
    };
    Failure::new(code, error_chain(e))
}
