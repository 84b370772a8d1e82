//! Chat templates: the Jinja text a model ships (GGUF `tokenizer.chat_template`
//! or `tokenizer_config.json`'s `chat_template`), rendered with minijinja as
//! Hugging Face's Rust servers do, with Python's string methods available.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One turn of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

/// A model's chat template with the special tokens it may refer to.
#[derive(Clone, Debug)]
pub struct ChatTemplate {
    source: String,
    pub bos_token: String,
    pub eos_token: String,
}

impl ChatTemplate {
    /// Checks that `source` parses, so a broken template is reported at load
    /// time rather than at the first message.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let template = Self {
            source: source.to_string(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        };
        template.environment()?;
        Ok(template)
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    fn environment(&self) -> Result<minijinja::Environment<'static>> {
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    message,
                ))
            },
        );
        env.add_template_owned("chat", self.source.clone())
            .map_err(|e| Error::Message(format!("chat template: {e}")))?;
        Ok(env)
    }

    /// The text for `messages`, ending with the assistant's header when
    /// `add_generation_prompt` (the prompt for the model's answer).
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let env = self.environment()?;
        let template = env
            .get_template("chat")
            .map_err(|e| Error::Message(e.to_string()))?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
            })
            .map_err(|e| Error::Message(format!("chat template: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are helpful<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_chatml_with_and_without_the_generation_prompt() -> Result<()> {
        let t = ChatTemplate::new(CHATML, "", "")?;
        let messages = [Message::new("user", "Hi")];
        assert_eq!(
            t.render(&messages, true)?,
            "<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert!(t.render(&messages, false)?.ends_with("Hi<|im_end|>\n"));
        Ok(())
    }

    #[test]
    fn python_methods_and_raise_exception_work() -> Result<()> {
        let t = ChatTemplate::new(
            "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}{{ bos_token }}{{ messages[0].content.strip() }}",
            "<s>",
            "</s>",
        )?;
        assert_eq!(t.render(&[Message::new("user", "  hi  ")], false)?, "<s>hi");
        let err = t.render(&[Message::new("system", "x")], false).unwrap_err();
        assert!(err.to_string().contains("first must be user"), "{err}");
        assert!(ChatTemplate::new("{% for %}", "", "").is_err());
        Ok(())
    }
}
